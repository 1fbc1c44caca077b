"""The harness of the multi-rank check scripts (``zero_scripts/zero_checks.py``, ``fsdp_scripts/fsdp_checks.py``):
every rank runs the named checks, and rank 0 writes one verdict per check for pytest to read."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable

import torch.distributed as dist

from hf_weyl import unwrap_adamweyl


def run_checks(runs: dict[str, Callable[[], None]], out: str) -> None:
    """Run each check on this rank (a barrier after each); rank 0 writes ``{name: "ok" or the traceback of the
    first rank where it failed}`` as JSON to ``out``."""
    results = {}
    for name, fn in runs.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to pytest
            results[name] = traceback.format_exc()
        dist.barrier()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {n: next((r[n] for r in gathered if r[n] != "ok"), "ok") for n in runs}
        with open(out, "w") as f:
            json.dump(merged, f, indent=1)


def full_weights(model) -> dict:
    """Every parameter of ``model`` as a full tensor (DTensors gathered), by name."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def stats_by_name(model, opt) -> dict:
    """``{parameter name: (lr ratio, σ_W, σ_U, capped)}`` of the AdamWeyl inside ``opt`` after its last step."""
    s = unwrap_adamweyl(opt).last_stats
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: (float(r), float(sw), float(su), bool(c))
        for p, r, sw, su, c in zip(s.params, s.lr_ratio, s.sigma_weight, s.sigma_update, s.capped)
    }
