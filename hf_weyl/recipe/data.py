"""Dataset loading shared by the recipes: raw text → packed token blocks, images → pixel tensors.

The same functions serve the real runs (OpenWebText, ImageNet from the Hub) and the offline
presets (local files written by :mod:`hf_weyl.recipe.presets`), so ``--preset tiny`` exercises the real path.

Bad local data is a :class:`~hf_weyl.recipe.errors.UserError` naming the file or folder and what is
expected (one line, before training): empty or binary text files, rows without a ``text`` column,
image folders that are empty, flat, hold one class or unreadable images, data smaller than one batch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import torch

from .errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "TEXT_EXTENSIONS",
    "check_image_folder",
    "first_rows",
    "image_transform",
    "load_image_datasets",
    "load_text_datasets",
    "pack_text",
    "require_rows",
]

#: Local text file types and the ``datasets`` builder that reads them (as in ``run_clm_no_trainer.py``).
TEXT_EXTENSIONS = {"txt": "text", "json": "json", "jsonl": "json", "csv": "csv"}
#: Image files an ``imagefolder`` holds (lower-case suffixes).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def _check_file(path: str, what: str, extensions: dict[str, str]) -> str:
    """The ``datasets`` builder of a local text file; a :class:`UserError` if it is missing, empty or binary."""
    if not os.path.isfile(path):
        raise UserError(f"{what}: no such file {path!r}")
    ext = path.rsplit(".", 1)[-1]
    if ext not in extensions:
        raise UserError(f"{what}: unsupported file type {ext!r} of {path!r}; valid types are {sorted(extensions)}")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise UserError(f"{what} {path!r} is empty; it needs one document per row (.jsonl/.json/.csv) or text (.txt)")
    nul = head.find(b"\0")
    if nul >= 0:
        raise UserError(f"{what} {path!r} is binary (a NUL byte at offset {nul}), not {ext} text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise UserError(f"{what} {path!r} is not UTF-8 text (invalid byte at offset {e.start})") from None
    return extensions[ext]


def _load_split(builder: str, path: str, what: str, streaming: bool, cache_dir: str | None) -> Any:
    kwargs = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
    try:
        return datasets.load_dataset(builder, data_files={"train": path}, split="train", cache_dir=cache_dir,
                                     streaming=streaming, **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as e:
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"{what} {path!r} cannot be read as {builder} rows: {first}") from None


def _require_text_column(split: Any, text_column: str, what: str) -> None:
    columns = list(split.column_names or [])
    if split.column_names is not None and text_column not in columns:
        raise UserError(f"{what} has no {text_column!r} column (columns: {columns}); each row needs a {text_column!r} field")


def load_text_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: float = 0.5,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Raw text as ``{"train", "validation"}`` from the Hub (``dataset_name``) or local files.

    Local files: ``.json``/``.jsonl``/``.csv`` hold one document per row; a ``.txt`` file is one document.

    A dataset without a validation split (OpenWebText) gets one held out: the first
    ``validation_split_percentage`` % of train (``take``/``skip`` when streaming).
    """
    if dataset_name is None and train_file is None:
        raise UserError("give a dataset_name (Hub) or a train_file (local .txt/.json/.jsonl/.csv)")
    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir)
        if "validation" in raw:
            return raw
        if streaming:
            n_val = int(validation_split_percentage * 100)  # rows; the stream length is unknown
            return datasets.IterableDatasetDict(validation=raw["train"].take(n_val), train=raw["train"].skip(n_val))
        pct = validation_split_percentage
        return datasets.DatasetDict(
            validation=datasets.load_dataset(dataset_name, dataset_config_name, split=f"train[:{pct}%]", cache_dir=cache_dir),
            train=datasets.load_dataset(dataset_name, dataset_config_name, split=f"train[{pct}%:]", cache_dir=cache_dir),
        )
    builder = _check_file(train_file, "train_file", TEXT_EXTENSIONS)
    raw = {"train": _load_split(builder, train_file, "train_file", streaming, cache_dir)}
    if validation_file is not None:
        if _check_file(validation_file, "validation_file", TEXT_EXTENSIONS) != builder:
            raise UserError(f"train_file {train_file!r} and validation_file {validation_file!r} must be the same file type")
        raw["validation"] = _load_split(builder, validation_file, "validation_file", streaming, cache_dir)
    for split, path in (("train", train_file), ("validation", validation_file)):
        if split in raw:
            _require_text_column(raw[split], "text", f"{split}_file {path!r}")
    if "validation" not in raw:
        if streaming:
            raise UserError("--streaming local files needs a validation_file")
        try:
            split = raw["train"].train_test_split(test_size=validation_split_percentage / 100, shuffle=False)
        except ValueError as e:
            raise UserError(f"train_file {train_file!r}: cannot hold out {validation_split_percentage}% of its "
                            f"{len(raw['train'])} rows for validation ({e}); give a validation_file or more rows") from None
        return datasets.DatasetDict(train=split["train"], validation=split["test"])
    return (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(raw)


def pack_text(
    raw: datasets.DatasetDict | datasets.IterableDatasetDict,
    tokenizer: Any,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Tokenize, concatenate and cut into ``block_size`` blocks (the ``group_texts`` of run_clm).

    Every row of the result has ``input_ids`` of exactly ``block_size`` tokens; the tail that does
    not fill a block is dropped.
    """
    if block_size < 2:
        raise UserError(f"block_size must be >= 2, got {block_size}")
    train = raw["train"]
    columns = list(train.column_names or [text_column])
    _require_text_column(train, text_column, "the dataset")
    streaming = isinstance(train, datasets.IterableDataset)
    map_kwargs = {} if streaming else {"num_proc": num_proc, "desc": "tokenize and pack"}

    def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        flat = list(chain.from_iterable(x + eos for x in ids))
        total = (len(flat) // block_size) * block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, total, block_size)]}

    return raw.map(tokenize_and_pack, batched=True, batch_size=1000, remove_columns=columns, **map_kwargs)


def load_image_datasets(
    dataset_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    token: str | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Images as ``{"train", "validation"}`` with columns ``image`` and ``label`` (a ClassLabel).

    From the Hub (``ILSVRC/imagenet-1k``, gated: needs a token) or ``imagefolder`` directories
    (``<dir>/<class name>/<image>``, checked first by :func:`check_image_folder`). Without a validation
    split, 10 % of train is held out, stratified by class.
    """
    if dataset_name is None and train_dir is None:
        raise UserError("give a dataset_name (Hub) or a train_dir (an imagefolder: <dir>/<class>/<image>)")
    if dataset_name is not None:
        source = f"dataset {dataset_name!r}"
        raw = datasets.load_dataset(dataset_name, token=token, cache_dir=cache_dir)
    else:
        source = f"train_dir {train_dir!r}"
        check_image_folder(train_dir, "train_dir")
        data_files = {"train": os.path.join(train_dir, "**")}
        if validation_dir is not None:
            check_image_folder(validation_dir, "validation_dir")
            data_files["validation"] = os.path.join(validation_dir, "**")
        raw = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    for column in ("image", "label"):
        if column not in raw["train"].column_names:
            raise UserError(f"{source} needs columns 'image' and 'label', got {raw['train'].column_names}")
    if "validation" not in raw:
        try:
            split = raw["train"].train_test_split(test_size=0.1, seed=0, stratify_by_column="label")
        except ValueError as e:
            raise UserError(f"{source}: {len(raw['train'])} images in {raw['train'].features['label'].num_classes} "
                            f"classes are too few to hold out a stratified 10% validation split ({e}); "
                            "give more images or a validation_dir") from None
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return raw


def check_image_folder(path: str, what: str = "train_dir", workers: int = 8) -> dict[str, int]:
    """Images per class of an imagefolder ``<path>/<class>/<image>``; a :class:`UserError` when the folder
    is missing or empty, flat (images not in class folders), nested deeper, holds fewer than two classes,
    or an image cannot be opened (every image's header is read and checked with PIL's ``verify``)."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{what}: no such directory {path!r}")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    layout = f"expected {what}/<class name>/<image> with image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    if not images:
        raise UserError(f"{what} {path!r} holds no images; {layout}")
    depth = {len(p.relative_to(root).parts) for p in images}
    if depth != {2}:
        odd = next(p for p in images if len(p.relative_to(root).parts) != 2)
        where = "directly in the folder" if len(odd.relative_to(root).parts) == 1 else "nested below a class folder"
        raise UserError(f"{what} {path!r}: {odd.relative_to(root)} is {where}; {layout}")
    per_class: dict[str, int] = {}
    for p in images:
        per_class[p.parent.name] = per_class.get(p.parent.name, 0) + 1
    if len(per_class) < 2:
        raise UserError(f"{what} {path!r} holds one class ({next(iter(per_class))!r}); classification needs at least "
                        f"two class folders; {layout}")

    def unreadable(p: Path) -> str | None:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for broken files
            return f"{p} ({type(e).__name__}: {e})"
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        bad = [b for b in pool.map(unreadable, images) if b is not None]
    if bad:
        raise UserError(f"{what} {path!r}: {len(bad)} of {len(images)} images cannot be read, e.g. {bad[0]}; "
                        "remove or replace them")
    return per_class


def first_rows(dataset: Any, n: int) -> Any:
    """The first ``n`` rows (``select``, or ``take`` when streaming): a shorter evaluation that runs its loader to the end.

    Breaking out of an accelerate data loader leaves it registered as the active one, so the training
    loader's end-of-epoch gradient sync is missed; evaluating a shorter dataset to the end avoids that."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(n)
    return dataset.select(range(min(n, len(dataset))))


def require_rows(dataset: Any, need: int, what: str, hint: str) -> None:
    """A :class:`UserError` if ``dataset`` has fewer than ``need`` rows (unknown lengths, when streaming, pass)."""
    try:
        have = len(dataset)
    except TypeError:
        return
    if have < need:
        raise UserError(f"{what} has {have} rows, fewer than the {need} needed; {hint}")


def image_transform(image_processor: Any, train: bool, augment: Any = None):
    """A ``set_transform`` function: PIL images → ``pixel_values`` via the image processor, ``labels``.

    ``augment`` (e.g. a torchvision transform on PIL images) runs first on training images.
    """

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [img.convert("RGB") for img in batch["image"]]
        if train and augment is not None:
            images = [augment(img) for img in images]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch["label"])}

    return transform
