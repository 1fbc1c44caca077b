"""Dataset loading shared by the recipes: raw text → packed token blocks, images → pixel tensors.

The same functions serve the real runs (OpenWebText, ImageNet from the Hub) and the offline
presets (local files written by :mod:`hf_weyl.recipe.presets`), so ``--preset tiny`` exercises the real path.
"""

from __future__ import annotations

import os
from itertools import chain
from typing import Any

import datasets
import torch

__all__ = [
    "TEXT_EXTENSIONS",
    "image_transform",
    "load_image_datasets",
    "load_text_datasets",
    "pack_text",
]

#: Local text file types and the ``datasets`` builder that reads them (as in ``run_clm_no_trainer.py``).
TEXT_EXTENSIONS = {"txt": "text", "json": "json", "jsonl": "json", "csv": "csv"}


def _check_file(path: str, what: str, extensions: dict[str, str]) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    ext = path.rsplit(".", 1)[-1]
    if ext not in extensions:
        raise ValueError(f"{what}: unsupported file type {ext!r} of {path!r}; valid types are {sorted(extensions)}")
    return extensions[ext]


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
        raise ValueError("give a dataset_name (Hub) or a train_file (local .txt/.json/.jsonl/.csv)")
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
    data_files = {"train": train_file}
    if validation_file is not None:
        if _check_file(validation_file, "validation_file", TEXT_EXTENSIONS) != builder:
            raise ValueError(f"train_file {train_file!r} and validation_file {validation_file!r} must be the same file type")
        data_files["validation"] = validation_file
    kwargs = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
    raw = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, streaming=streaming, **kwargs)
    if "validation" not in raw:
        if streaming:
            raise ValueError("streaming local files needs a validation_file")
        split = raw["train"].train_test_split(test_size=validation_split_percentage / 100, shuffle=False)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return raw


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
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    train = raw["train"]
    columns = list(train.column_names or [text_column])
    if text_column not in columns:
        raise ValueError(f"text column {text_column!r} not in the dataset's columns {columns}")
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
    (``<dir>/<class name>/<image>``).
    """
    if dataset_name is None and train_dir is None:
        raise ValueError("give a dataset_name (Hub) or a train_dir (an imagefolder: <dir>/<class>/<image>)")
    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, token=token, cache_dir=cache_dir)
    else:
        for what, path in (("train_dir", train_dir), ("validation_dir", validation_dir)):
            if path is not None and not os.path.isdir(path):
                raise FileNotFoundError(f"{what}: no such directory {path!r}")
        data_files = {"train": os.path.join(train_dir, "**")}
        if validation_dir is not None:
            data_files["validation"] = os.path.join(validation_dir, "**")
        raw = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.1, seed=0, stratify_by_column="label")
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    for column in ("image", "label"):
        if column not in raw["train"].column_names:
            raise ValueError(f"image dataset needs columns 'image' and 'label', got {raw['train'].column_names}")
    return raw


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
