"""The offline presets: real data from installed software, through datasets + tokenizer / image processor."""

from __future__ import annotations

import json

import pytest
import torch

from hf_weyl.recipe import presets


def test_tiny_text_splits_are_packed_blocks_of_stdlib_source():
    splits, tokenizer = presets.tiny_text_splits(block_size=64)
    assert set(splits) == {"train", "validation"}
    assert splits["train"].column_names == ["input_ids"]
    assert len(splits["train"]) > 5 * len(splits["validation"]) > 0
    rows = splits["train"][:50]["input_ids"] + splits["validation"][:50]["input_ids"]
    assert all(len(r) == 64 for r in rows)
    assert max(max(r) for r in rows) < len(tokenizer) == presets.TINY_TEXT_VOCAB_SIZE
    text = tokenizer.decode(splits["train"][0]["input_ids"])
    train_file, validation_file = presets.tiny_text_files()
    first_doc = json.loads(open(train_file).readline())["text"]
    assert first_doc.startswith(text)  # blocks are contiguous, byte-level BPE round-trips exactly
    # no source file is in both splits
    docs = {split: {json.loads(line)["text"] for line in open(path)} for split, path in
            (("train", train_file), ("validation", validation_file))}
    assert docs["train"].isdisjoint(docs["validation"])
    # documents are separated by the end-of-text token
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id is not None


def test_tiny_text_splits_are_cached_and_deterministic():
    a, tok_a = presets.tiny_text_splits(block_size=64)
    b, tok_b = presets.tiny_text_splits(block_size=64)
    assert a["train"][:20]["input_ids"] == b["train"][:20]["input_ids"]
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert a["train"].cache_files  # read back from the datasets cache, not recomputed in memory


def test_tiny_image_splits_are_digits_through_the_image_processor():
    splits, processor = presets.tiny_image_splits()
    assert (len(splits["train"]), len(splits["validation"])) == (1437, 360)  # sklearn's 1797 digits, 80/20
    assert splits["train"].features["label"].names == [str(i) for i in range(10)]
    row = splits["train"][0]
    assert row["pixel_values"].shape == (3, presets.TINY_IMAGE_SIZE, presets.TINY_IMAGE_SIZE)
    assert -1.0 <= float(row["pixel_values"].min()) < float(row["pixel_values"].max()) <= 1.0
    labels = torch.as_tensor(splits["validation"][:]["labels"])
    assert set(labels.tolist()) == set(range(10))
    assert processor.size == {"height": presets.TINY_IMAGE_SIZE, "width": presets.TINY_IMAGE_SIZE}


def test_tiny_configs_and_overrides():
    gpt = presets.tiny_gpt2_config(100, n_layer=3)
    assert (gpt.vocab_size, gpt.n_layer, gpt.n_head, gpt.n_embd) == (100, 3, 4, 128)
    assert gpt.resid_pdrop == gpt.attn_pdrop == gpt.embd_pdrop == 0.0
    vit = presets.tiny_vit_config(10, patch_size=8)
    assert (vit.num_labels, vit.patch_size, vit.image_size) == (10, 8, presets.TINY_IMAGE_SIZE)


def test_metrics_ship_inside_the_package_and_load_offline():
    from hf_weyl.recipe.metrics import available_metrics, load_metric

    assert available_metrics() == ["accuracy", "perplexity"]
    acc = load_metric("accuracy")
    acc.add_batch(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4])
    assert acc.compute() == {"accuracy": 0.75}
    ppl = load_metric("perplexity").compute(losses=[1.0, 3.0])
    assert ppl["loss"] == 2.0 and ppl["perplexity"] == pytest.approx(torch.tensor(2.0).exp().item())
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        load_metric("bleu")
