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


class KernelRecorder:
    """The CPU kernel, recording each call of the fused pieces step (one ``pieces_pass1`` per call): the partition,
    whether pass 1 was handed a kept B_W x_W, and pass 2's z (reduced in place after the call: read the flags once the
    step has returned)."""

    def __init__(self, kernel=None) -> None:
        self._kernel = kernel
        self.steps: list[dict] = []

    def around(self, kernel) -> KernelRecorder:
        """This recorder, now around ``kernel`` (the one a step was handed)."""
        self._kernel = kernel
        return self

    def __getattr__(self, name):
        return getattr(self._kernel, name)

    @property
    def kept_given(self) -> list[bool]:
        return [step["kept"] for step in self.steps]

    @property
    def flags(self) -> list[float]:
        """Pass 2's stale flag of every pass 2 run (a repeat's included), in order."""
        return [float(out[-1]) for step in self.steps for out in step["pass2"]]

    def pieces_pass1(self, *args):
        self.steps.append({"flat": id(args[0]), "kept": args[-1].numel() > 0, "pass2": []})
        return self._kernel.pieces_pass1(*args)

    def pieces_pass2(self, *args):
        self.steps[-1]["pass2"].append(args[-2])  # z, which pass 2 fills (its flag last) and the step then reduces
        return self._kernel.pieces_pass2(*args)

    def pieces_pass2_of(self, *args):
        """Pass 2 on the pieces of a mask (the overlapped step on more than one rank): recorded as (mask, full, this
        rank's own stale flag of those pieces, read as the call returns)."""
        out = self._kernel.pieces_pass2_of(*args)
        z, full, mask = args[-3], args[-2], list(args[-1])
        self.steps[-1].setdefault("pass2_of", []).append((mask, bool(full), float(z[-1])))
        return out

    def passes_of(self, step: int, whole: list[int]) -> list[tuple[str, bool, float]]:
        """Step ``step``'s masked pass 2 runs as ("whole" | "rest", full, own flag); ``whole``: the mask of the pieces
        this rank holds whole."""
        return [("whole" if mask == whole else "rest", full, flag)
                for mask, full, flag in self.steps[step].get("pass2_of", [])]

    def shards_pass1(self, *args):  # (the same on shards: their pieces' starts and sizes stand for the partition)
        self.steps.append({"flat": (tuple(args[5]), tuple(args[6])), "kept": args[-1].numel() > 0, "pass2": []})
        return self._kernel.shards_pass1(*args)

    def shards_pass2(self, *args):
        self.steps[-1]["pass2"].append(args[-2])
        return self._kernel.shards_pass2(*args)
