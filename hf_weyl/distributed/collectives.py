"""The collectives of AdamW²'s distributed step, on a device the process group's backend takes.

Under optimizer offload (DeepSpeed ZeRO-Offload, FSDP2's ``CPUOffloadPolicy``) the weights, gradients and
power-iteration vectors the optimizer steps live on the CPU while the process group is usually NCCL, which
takes CUDA tensors only. Every collective here asks the group's backend which devices it serves (torch's
``Backend.backend_capability``; a multi-device backend string such as ``"cpu:gloo,cuda:nccl"`` serves the
devices it names) and, for a CPU tensor it cannot take, reduces a copy on the current accelerator and copies
the result back — a few KiB of vectors per power iteration, not matrices. The decision depends only on the
backend and the tensor's device, which are the same on every rank, so every rank makes the same calls.

Each collective's ``Work`` is kept until the next one (``KEPT_WORK``). The reason is gloo's worker thread: in
torch 2.13 the worker that ran a collective drops its reference to the collective's tensors after it has
woken the caller. If that is the last reference to a tensor with a Python object, the worker must take the
GIL to release it. A process that exits within a few milliseconds of its last collective can then reach
interpreter shutdown with the worker waiting for the GIL; the worker is ended inside a C++ destructor and the
process aborts ("terminate called without an active exception") after its work is done. Kept, the ``Work``
is released later by the thread that replaces it, which holds the GIL, so the worker never needs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["COMM_STATS", "KEPT_WORK", "PendingReduce", "all_gather", "all_reduce_", "all_reduce_start",
           "collective_device"]


class _Comm:
    """Payload bytes this process handed to the σ collectives (for benchmarks)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def add(self, t: Tensor) -> None:
        self.bytes += t.numel() * t.element_size()
        self.calls += 1

    def reset(self) -> None:
        self.bytes = 0
        self.calls = 0


COMM_STATS = _Comm()


class _KeptWork:
    """The last collective's ``Work``, kept so that its tensors are released by this thread (see above)."""

    def __init__(self) -> None:
        self.work: Any = None

    def wait(self, work: Any) -> None:
        """Wait for ``work`` and keep it in place of the one before."""
        work.wait()
        self.work = work


KEPT_WORK = _KeptWork()


def _served_devices(group: Any) -> set[str]:
    """The device types the backend of ``group`` runs collectives on."""
    backend = str(dist.get_backend(group))
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        return {part.split(":", 1)[0].strip() for part in backend.split(",") if ":" in part}
    capability = getattr(dist.Backend, "backend_capability", {})
    return set(capability.get(backend.lower(), ["cpu", "cuda"]))  # a backend torch does not know: as gloo


def collective_device(t: Tensor, group: Any) -> torch.device:
    """Where a collective on ``t`` runs: ``t``'s own device if the group's backend serves it, else (a CPU tensor
    on an accelerator-only backend such as NCCL) the current accelerator; raises if there is none."""
    if t.device.type in _served_devices(group):
        return t.device
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None or accelerator.type not in _served_devices(group):
        raise RuntimeError(
            f"AdamWeyl: the process group's backend {dist.get_backend(group)!r} takes no {t.device.type} tensors and "
            "no accelerator it serves is available for the σ collectives; initialise the process group with a "
            "backend for both devices (e.g. torch.distributed.init_process_group('cpu:gloo,cuda:nccl'))"
        )
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def all_reduce_(t: Tensor, group: Any, op: Any = None) -> None:
    """``dist.all_reduce`` of ``t`` in place (sum unless ``op``), on a device the group's backend takes."""
    all_reduce_start(t, group, op).wait()


class PendingReduce:
    """An all-reduce in flight (:func:`all_reduce_start`): ``wait()`` once, then the tensor holds the sum."""

    def __init__(self, work: Any, t: Tensor, moved: Tensor | None) -> None:
        self._work, self._t, self._moved = work, t, moved

    def wait(self) -> None:
        KEPT_WORK.wait(self._work)
        if self._moved is not None:
            self._t.copy_(self._moved)


def all_reduce_start(t: Tensor, group: Any, op: Any = None) -> PendingReduce:
    """:func:`all_reduce_` started, not waited for: the caller works on until it needs the sum (and must not touch
    ``t`` until then). The same calls in the same order on every rank, as for :func:`all_reduce_`."""
    COMM_STATS.add(t)
    op = dist.ReduceOp.SUM if op is None else op
    device = collective_device(t, group)
    moved = None if device == t.device else t.to(device)
    work = dist.all_reduce(t if moved is None else moved, op=op, group=group, async_op=True)
    return PendingReduce(work, t, moved)


def all_gather(t: Tensor, group: Any) -> list[Tensor]:
    """``dist.all_gather`` of ``t`` from every rank of ``group`` (results on ``t``'s device)."""
    COMM_STATS.add(t)
    device = collective_device(t, group)
    moved = t.to(device)
    out = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    KEPT_WORK.wait(dist.all_gather(out, moved, group=group, async_op=True))
    return out if device == t.device else [o.to(t.device) for o in out]
