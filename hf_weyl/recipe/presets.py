"""Offline ``--preset tiny`` data and models: real data that ships with installed software.

* text: the standard library's own ``.py`` sources (present on every Python installation), a
  byte-level BPE tokenizer trained on them with ``tokenizers``, packed into blocks through
  :func:`hf_weyl.recipe.data.load_text_datasets` / :func:`hf_weyl.recipe.data.pack_text` on local ``.txt`` files;
* images: scikit-learn's 8×8 handwritten digits written as an ``imagefolder`` of PNGs, read
  through :func:`hf_weyl.recipe.data.load_image_datasets` and a ``ViTImageProcessor``.

Files are cached under ``$HF_WEYL_CACHE`` (default ``~/.cache/hf_weyl``); writes are atomic, so
concurrent first calls are safe and later calls only load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import datasets
import transformers

from .data import image_transform, load_image_datasets, load_text_datasets, pack_text

__all__ = [
    "TINY_TEXT_VOCAB_SIZE",
    "cache_root",
    "tiny_gpt2_config",
    "tiny_image_dirs",
    "tiny_image_processor",
    "tiny_image_splits",
    "tiny_text_files",
    "tiny_text_splits",
    "tiny_text_tokenizer",
    "tiny_vit_config",
]

TINY_TEXT_VOCAB_SIZE = 2048
EOS = "<|endoftext|>"
#: Bytes of stdlib source used for training (about 1M tokens) and for validation.
TINY_TEXT_TRAIN_BYTES = 3_000_000
TINY_TEXT_VALIDATION_BYTES = 300_000
TINY_IMAGE_SIZE = 32


def cache_root() -> Path:
    """``$HF_WEYL_CACHE`` or ``~/.cache/hf_weyl``."""
    return Path(os.environ.get("HF_WEYL_CACHE", Path.home() / ".cache" / "hf_weyl"))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _stdlib_sources() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def tiny_text_files(seed: int = 0) -> tuple[str, str]:
    """``(train.jsonl, validation.jsonl)``: one ``{"text": source}`` row per stdlib ``.py`` file (whole
    files, shuffled by ``seed``) up to ``TINY_TEXT_TRAIN_BYTES`` / ``TINY_TEXT_VALIDATION_BYTES``; no
    file is in both. One document per row, like OpenWebText."""
    sources = _stdlib_sources()
    if not sources:
        raise RuntimeError(f"no .py files found in the standard library at {sysconfig.get_paths()['stdlib']!r}")
    random.Random(seed).shuffle(sources)
    key = hashlib.sha1("\n".join(f"{p}:{p.stat().st_size}" for p in sources).encode()).hexdigest()[:10]
    folder = cache_root() / "tiny_text" / f"seed{seed}-{key}"
    train_path, val_path = folder / "train.jsonl", folder / "validation.jsonl"
    if not (train_path.exists() and val_path.exists()):
        texts: dict[str, list[str]] = {"validation": [], "train": []}
        budgets = {"validation": TINY_TEXT_VALIDATION_BYTES, "train": TINY_TEXT_TRAIN_BYTES}
        split = "validation"
        for path in sources:
            text = path.read_text(encoding="utf-8", errors="replace")
            texts[split].append(text)
            budgets[split] -= len(text)
            if budgets[split] <= 0:
                if split == "train":
                    break
                split = "train"
        _atomic_write_text(train_path, "".join(json.dumps({"text": t}) + "\n" for t in texts["train"]))
        _atomic_write_text(val_path, "".join(json.dumps({"text": t}) + "\n" for t in texts["validation"]))
    return str(train_path), str(val_path)


def tiny_text_tokenizer(train_file: str, vocab_size: int = TINY_TEXT_VOCAB_SIZE) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on the texts of ``train_file`` (jsonl), cached next to it."""
    path = Path(train_file).parent / f"tokenizer-{vocab_size}" / "tokenizer.json"
    if not path.exists():
        from tokenizers import ByteLevelBPETokenizer

        with open(train_file, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
        _atomic_write_text(path, bpe._tokenizer.to_str())
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=1024
    )


def tiny_text_splits(
    block_size: int = 64, seed: int = 0, vocab_size: int = TINY_TEXT_VOCAB_SIZE
) -> tuple[datasets.DatasetDict, transformers.PreTrainedTokenizerFast]:
    """``({"train", "validation"} with "input_ids" of ``block_size`` tokens, tokenizer)`` from stdlib sources."""
    train_file, validation_file = tiny_text_files(seed)
    tokenizer = tiny_text_tokenizer(train_file, vocab_size)
    raw = load_text_datasets(train_file=train_file, validation_file=validation_file)
    return pack_text(raw, tokenizer, block_size), tokenizer


def tiny_gpt2_config(vocab_size: int, **overrides: Any) -> transformers.GPT2Config:
    """A small GPT-2: 2 layers, 128 wide, 4 heads, 64 positions, no dropout (the paper's GPT runs use none)."""
    kwargs = dict(
        vocab_size=vocab_size, n_positions=64, n_embd=128, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


def tiny_image_dirs(seed: int = 0, validation_fraction: float = 0.2) -> tuple[str, str]:
    """``(train_dir, validation_dir)``: scikit-learn's digits as ``<dir>/<digit>/<index>.png``
    (grey levels 0..16 scaled to 0..255), split per class with ``seed``."""
    folder = cache_root() / "tiny_images" / f"digits-seed{seed}-val{validation_fraction}"
    if not (folder / "done").exists():
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(
            idx, test_size=validation_fraction, random_state=seed, stratify=digits.target
        )
        tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else _mkdir(folder.parent)))
        for split, indices in (("train", train_idx), ("validation", val_idx)):
            for i in indices:
                label_dir = tmp / split / str(int(digits.target[i]))
                label_dir.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(label_dir / f"{i:04d}.png")
        (tmp / "done").write_text("ok\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder / "train"), str(folder / "validation")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_image_processor(size: int = TINY_IMAGE_SIZE) -> Any:
    """Resize the 8×8 digits to ``size``² RGB, scale to [0, 1], normalise with mean = std = 0.5.

    A ``ViTImageProcessor`` (its PIL backend when torchvision is absent)."""
    import importlib.util

    cls = transformers.ViTImageProcessor if importlib.util.find_spec("torchvision") else transformers.ViTImageProcessorPil
    return cls(
        do_resize=True, size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def tiny_image_splits(seed: int = 0) -> tuple[datasets.DatasetDict, Any]:
    """``({"train", "validation"} yielding "pixel_values" (3×32×32) and "labels", image processor)``."""
    train_dir, validation_dir = tiny_image_dirs(seed)
    raw = load_image_datasets(train_dir=train_dir, validation_dir=validation_dir)
    processor = tiny_image_processor()
    raw["train"].set_transform(image_transform(processor, train=True))
    raw["validation"].set_transform(image_transform(processor, train=False))
    return raw, processor


def tiny_vit_config(num_labels: int, **overrides: Any) -> transformers.ViTConfig:
    """A small ViT for 32×32 digits: patch 4 (64 patches), 128 wide, 4 layers, 4 heads."""
    kwargs = dict(
        image_size=TINY_IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    kwargs.update(overrides)
    return transformers.ViTConfig(**kwargs)
