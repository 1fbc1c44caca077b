"""The paper's claim in miniature: without warmup at a high lr, AdamW collapses attention, AdamWeyl does not.

Tiny GPT-2 preset (offline text), lr 0.1, betas (0.9, 0.95), wd 0.1, grad clip 1.0, no warmup, 250 steps.
Measured (2 CPU cores): AdamW ends with attention entropy ~0.001 nats, σ1(W_qᵀW_k) ~800, SEC(1) ~1 and
val loss ~6.66; AdamWeyl (τ = 0.01) keeps entropy ~1.6, σ1(W_qᵀW_k) < 1 and reaches ~6.48.
"""

import pytest
import torch
from transformers import GPT2LMHeadModel

from hf_weyl import AdamWeyl
from hf_weyl.monitor import collect_metrics
from hf_weyl.recipe.presets import tiny_gpt2_config, tiny_text_splits

STEPS, LR, BATCH = 250, 0.1, 16


def train_no_warmup(optimizer_name: str) -> tuple[float, dict[str, float]]:
    splits, tokenizer = tiny_text_splits(block_size=64, seed=0)
    data = torch.tensor(splits["train"]["input_ids"])
    val = torch.tensor(splits["validation"]["input_ids"][:64])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer)))
    kwargs = dict(lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    if optimizer_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), **kwargs)
    else:
        opt = AdamWeyl(model.parameters(), **kwargs, tau=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        batch = data[torch.randint(0, len(data), (BATCH,), generator=gen)]
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        val_loss = model(input_ids=val, labels=val).loss.item()
    return val_loss, collect_metrics(model, {"input_ids": val[:8], "labels": val[:8]})


@pytest.mark.slow
def test_adamw_collapses_without_warmup_and_adamweyl_does_not():
    adamw_loss, adamw = train_no_warmup("adamw")
    weyl_loss, weyl = train_no_warmup("adamweyl")

    # AdamW: malignant collapse — near-zero entropy, exploding and concentrated W_qᵀW_k.
    assert adamw["monitor/entropy_min"] < 0.05, adamw["monitor/entropy_min"]
    assert adamw["monitor/sigma_qk_max"] > 100, adamw["monitor/sigma_qk_max"]
    assert adamw["monitor/sec1_max"] > 0.95
    # AdamWeyl: healthy attention and a small, spread-out W_qᵀW_k.
    assert weyl["monitor/entropy_min"] > 0.5, weyl["monitor/entropy_min"]
    assert weyl["monitor/sigma_qk_max"] < 10, weyl["monitor/sigma_qk_max"]
    assert weyl["monitor/sec1_max"] < adamw["monitor/sec1_max"]
    # ... and the collapse costs AdamW loss.
    assert weyl_loss < adamw_loss - 0.05, (weyl_loss, adamw_loss)
