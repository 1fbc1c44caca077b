"""The σ collectives run on a device the process group's backend takes (optimizer offload: CPU vectors, NCCL group)."""

from __future__ import annotations

import ast
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hf_weyl.distributed import collectives

PACKAGE = Path(__file__).resolve().parents[1] / "hf_weyl"


@pytest.fixture
def backend(monkeypatch):
    """Report the given backend for every group, and a CUDA device as the current accelerator."""

    def report(name, accelerator="cuda"):
        monkeypatch.setattr(dist, "get_backend", lambda group=None: name)
        device = torch.device(accelerator) if accelerator else None
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: device)
        monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)

    return report


def test_cpu_tensors_go_to_the_accelerator_on_nccl(backend):
    backend("nccl")
    assert collectives.collective_device(torch.zeros(3), None) == torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["gloo", "cpu:gloo,cuda:nccl", "mpi", "ucc"])
def test_cpu_tensors_stay_on_backends_that_take_them(backend, name):
    backend(name)
    assert collectives.collective_device(torch.zeros(3), None) == torch.device("cpu")


def test_nccl_without_an_accelerator_says_what_to_do(backend):
    backend("nccl", accelerator=None)
    with pytest.raises(RuntimeError, match=r"'nccl' takes no cpu tensors.*cpu:gloo,cuda:nccl"):
        collectives.collective_device(torch.zeros(3), None)


def test_all_reduce_moves_to_the_collective_device_and_back(backend, monkeypatch):
    """On a backend that does not take the tensor's device the reduction runs on a copy there and the result
    comes back in place (the device here is the meta device standing in for CUDA: the data path is checked
    on real ranks; this checks where the collective is called)."""
    backend("nccl")
    seen = []
    monkeypatch.setattr(collectives, "collective_device", lambda t, group: torch.device("meta"))
    done = type("Done", (), {"wait": lambda self: None})()
    monkeypatch.setattr(dist, "all_reduce",
                        lambda t, op=None, group=None, async_op=False: seen.append(t.device) or done)
    t = torch.ones(4)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src: seen.append(("copy_back", src.device)) or self)
    collectives.all_reduce_(t, None)
    assert seen == [torch.device("meta"), ("copy_back", torch.device("meta"))]


def test_every_collective_of_the_package_goes_through_collectives_py():
    """No raw torch.distributed collective elsewhere in hf_weyl (each would take CPU tensors to NCCL)."""
    names = {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "reduce", "gather", "scatter"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, ast.Name) \
                    and node.value.id == "dist":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} dist.{node.attr}")
    assert not offenders, offenders


def test_a_collectives_tensors_are_released_by_the_caller_not_by_gloos_worker():
    """gloo's worker thread must never drop the last reference to a collective's tensor: that takes the GIL, and a
    process exiting right after its last collective then aborts at interpreter shutdown (seen as a SIGABRT,
    "terminate called without an active exception", in scripts/gpu_check.py fsdp2). The collective's Work is kept
    until the next collective, which releases it on the calling thread."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        released = []

        def one_collective():
            t = torch.ones(4)
            weakref.finalize(t, lambda: released.append(threading.get_ident()))
            collectives.all_reduce_(t, dist.group.WORLD)

        one_collective()
        time.sleep(0.2)  # ample time for gloo's worker to be done with the collective
        assert released == [], "the collective's tensor was released before the next collective"
        collectives.all_reduce_(torch.ones(4), dist.group.WORLD)
        assert released == [threading.get_ident()]
    finally:
        dist.destroy_process_group()
