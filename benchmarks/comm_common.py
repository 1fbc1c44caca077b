"""What ``zero_comm.py`` and ``fsdp_comm.py`` share: the small GPT-2 both engines are measured on, its batches and
the HF Trainer's param groups, and the table of σ bytes per step for GPT-2 small's shapes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from hf_weyl.core.optimizer import DEFAULT_COLD_START_ITERS
from hf_weyl.distributed import SIGMA_MODES

Traffic = dict[str, float]  # "payload", "wire", "collectives"


def param_groups(model, wd=0.1):
    """As the HF Trainer builds them: matrices with weight decay, 1-D tensors without."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}]


def capped_shapes(model):
    """Shapes of the matrices AdamW² caps (``parameters()`` counts tied weights once)."""
    return [tuple(p.shape) for p in model.parameters() if p.ndim >= 2]


def mib(x):
    return f"{x / 2**20:.2f} MiB"


def small_gpt2(layers, width, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=1000, n_positions=128)
    return GPT2LMHeadModel(cfg)


def batch(step, seq=64):
    g = torch.Generator().manual_seed(step * 7 + dist.get_rank())
    return torch.randint(0, 1000, (4, seq), generator=g)


def gpt2_small_table(engine: str, predict: Callable[..., Traffic],
                     own: Callable[[int, int], dict[str, float]]) -> None:
    """Print σ bytes per rank per step for GPT-2 small (built on the meta device) at 2 and 8 ranks, warm and on the
    cold first step, next to the engine's own traffic on the wire. ``predict(shapes, world, mode, power_iters=)``: the
    engine's formula; ``own(world, n)``: ``{label: bytes on the wire}`` of the engine for n parameters."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    n = sum(p.numel() for p in model.parameters())
    shapes = capped_shapes(model)
    labels = " / ".join(own(2, n))
    print(f"\n## GPT-2 small ({n / 1e6:.1f}M parameters, {len(shapes)} capped matrices), bytes per rank per step")
    print(f"| ranks | σ mode | payload | on the wire (ring) | collectives | vs {engine}'s own traffic on the wire ({labels}) |")
    print("|---|---|---|---|---|---|")
    cold = DEFAULT_COLD_START_ITERS
    for world in (2, 8):
        base = own(world, n)
        for mode in SIGMA_MODES:
            for iters, label in ((1, "warm, 1 iter"), (cold, f"cold start, {cold} iters")):
                if mode == "gather" and iters > 1:
                    continue  # gather sends the matrices once, whatever the iterations
                p = predict(shapes, world, mode, power_iters=iters)
                versus = " / ".join(f"{p['wire'] / b:.2%} of {mib(b)}" for b in base.values())
                print(f"| {world} | {mode} ({label}) | {mib(p['payload'])} | {mib(p['wire'])} | {int(p['collectives'])} "
                      f"| {versus} |")
