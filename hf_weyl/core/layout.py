"""What the step runs on: *units* (the tensors the elementwise AdamW maths runs on) and the *parts* of
parameters they hold, each with the layout of its matrix across ranks.

An engine adapter (``hf_weyl.integrations``) only describes; :class:`~hf_weyl.core.AdamWeyl` steps:

* a parameter whole on one device is one unit with one part (layout ``None``);
* an FSDP2 / tensor-parallel DTensor is one unit (its local shard) with one part whose layout is a
  :class:`RowPiece` (dim-0 shards: FSDP2, HSDP, ColwiseParallel) or a :class:`Block` (any other mix of
  shards: RowwiseParallel, FSDP2 × TP), or ``None`` when it is replicated;
* a DeepSpeed ZeRO flat fp32 partition is one unit holding a :class:`RowPiece` of every parameter of its
  group (possibly empty on this rank); the elements no part covers (padding) are stepped as AdamW.

The matrix of a parameter is its ``(shape[0], rest)`` view (``(1, n)`` for vectors). A part's σ's are those
of the full matrix, whichever piece of it this rank holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["SIGMA_MODES", "Block", "Part", "RowPiece", "ShardedSigma", "StepPlan", "Unit", "uncovered"]

#: How σ's of matrices split across ranks are computed (the ``sigma_mode`` option of ``AdamWeyl``):
#: ``"vector_reduce"`` (each rank multiplies its piece; the power-iteration vectors are all-reduced) or
#: ``"gather"`` (all-gather the pieces into whole matrices; for checking).
SIGMA_MODES = ("vector_reduce", "gather")


@dataclass(frozen=True)
class RowPiece:
    """Elements [``start``, ``start + numel``) of the row-major flattening of an (m × n) matrix (``dims``); the other
    ranks of ``group`` hold the rest (contiguous pieces: ZeRO partitions, FSDP2's dim-0 shards)."""

    dims: tuple[int, int]
    start: int
    numel: int
    group: Any


@dataclass(frozen=True)
class Block:
    """Rows ``rows`` × columns ``cols`` (global positions: a ``slice`` or an int64 tensor) of an (m × n) matrix,
    its local tensor that block row-major. Partial products are summed over ``groups`` in turn (together they
    span the ranks holding different blocks; replicas are in none). ``grid``: every such rank's (rows, cols), in
    the order all-gathers over ``groups`` concatenate them (``sigma_mode="gather"`` only)."""

    dims: tuple[int, int]
    rows: Any
    cols: Any
    groups: tuple[Any, ...]
    grid: tuple[tuple[Any, Any], ...] | None = None


@dataclass
class Part:
    """One parameter's share of a unit: its elements [``offset``, ``offset + numel``) of the flattened unit
    (``numel`` None: the whole unit, in the unit's own layout), the parameter's full ``shape``, and where its
    matrix lives (``layout`` None: whole on this device)."""

    param: Tensor
    shape: torch.Size
    layout: RowPiece | Block | None = None
    offset: int = 0
    numel: int | None = None

    @property
    def whole_unit(self) -> bool:
        return self.numel is None


@dataclass
class Unit:
    """A tensor the elementwise maths runs on. ``key``: the tensor whose optimizer state holds the moments (the
    parameter, or a ZeRO flat partition); ``param``/``grad``: the local values; ``parts``: what it holds."""

    key: Tensor
    param: Tensor
    grad: Tensor
    parts: list[Part]


class ShardedSigma(Protocol):
    """σ's of matrices split across ranks (``hf_weyl.distributed.LAYOUT_SIGMA``), as the core step needs them.

    ``sigmas(layouts, weights, directions, weight_vectors, update_vectors, iters, mode)``: (σ_W, σ_U) of the
    matrices whose local pieces/blocks are given (a collective call). ``all_reduce_(t, group)``: a sum over the
    group, in place (the fused CPU step on row pieces reduces its partial products itself);
    ``all_reduce_start(t, group)``: the same started, returning a handle whose ``wait()`` completes it."""

    def sigmas(self, layouts: list[Any], weights: list[Tensor], directions: list[Tensor], weight_vectors: list[Tensor],
               update_vectors: list[Tensor], iters: Any, mode: str) -> tuple[Tensor, Tensor]: ...

    def all_reduce_(self, t: Tensor, group: Any) -> None: ...

    def all_reduce_start(self, t: Tensor, group: Any) -> Any: ...


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class StepPlan:
    """An adapter's description of one ``step()`` of a param group.

    ``local`` maps an optimizer-state tensor to the tensor the maths runs on (a DTensor moment's local shard);
    ``sigma`` computes σ's of parts with a layout (needed when any part has one); ``partial``: this call steps only
    some of the group's units (DeepSpeed ZeRO steps one flat partition per call), so the other units keep the
    statistics of their last step."""

    units: list[Unit]
    engine: str = "single_device"
    sigma: ShardedSigma | None = None
    local: Callable[[Tensor], Tensor] = field(default=_identity)
    partial: bool = False


def uncovered(total: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The stretches ``(offset, numel)`` of [0, total) that none of ``spans`` (``(offset, numel)``, non-overlapping)
    covers: a ZeRO partition's padding and the pieces of parameters not in the list."""
    out, pos = [], 0
    for off, numel in sorted((s for s in spans if s[1]), key=lambda s: s[0]):
        if off < pos:
            raise RuntimeError("AdamWeyl: overlapping parameter pieces in one flat partition")
        if off > pos:
            out.append((pos, off - pos))
        pos = off + numel
    if pos < total:
        out.append((pos, total - pos))
    return out
