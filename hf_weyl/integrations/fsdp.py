"""AdamW² under PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), and the refusal of FSDP1.

FSDP2 turns every parameter into a DTensor sharded on dim 0 (``Shard(0)``; HSDP: ``(Replicate(),
Shard(0))`` on a 2-D mesh). The parameter's matrix view (m × n) is row-major, so the rows a rank holds,
[r0, r0 + q), are the contiguous elements [r0·n, (r0 + q)·n) of the flattened matrix: exactly the pieces
``hf_weyl.distributed`` computes σ's of. The adapter

* runs the elementwise AdamW part on the local shards (``to_local()`` of parameters, gradients and the
  DTensor moments: no DTensor dispatch), keeping the optimizer state as DTensors, so
  ``torch.distributed.checkpoint`` (``get_state_dict``/``set_state_dict``) saves and reshards it; the
  power-iteration vectors are plain fp32 tensors, replicated on every rank (their length depends only
  on the full shape, so they load on any number of ranks);
* translates each parameter's placement into its piece (rows [c·i, c·i + q) on shard coordinate i, with
  c = ⌈m / world⌉ — ``torch.chunk`` semantics, as FSDP2 and DTensor shard), verifies it once at the
  first step (local row counts against that formula, and their sum over the shard group against m),
  and caches it;
* refuses any other placement (``Shard(1)`` from ``shard_placement_fn``, tensor-parallel meshes,
  ``Partial``, strided shards) with a message naming the parameter's shape and placement.

FSDP1 (``FullyShardedDataParallel``) hands the optimizer 1-D flat parameters or 1-D views of them: no
matrix is visible, and stepping them would silently train plain AdamW. Such parameters are refused at
construction (and at any later step) with a message pointing to FSDP2.

Private torch attributes read here (only here): ``torch.distributed.fsdp._common_utils.FSDP_FLATTENED``
(the attribute FSDP1 sets on flat and flattened-original parameters) and
``torch.distributed.fsdp._flat_param.FlatParameter``. If a torch upgrade removes them while FSDP is
in use, every step is refused (fail closed) rather than the FSDP1 refusal silently switched off.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..core.optimizer import AdamWeyl, CapStats, register_engine_adapter
from ..core.power_iteration import power_iteration_
from ..distributed.collectives import all_reduce_
from ..distributed.sigma import Pieces, matrix_dims, sharded_sigmas

__all__ = ["FSDP2Adapter", "fsdp1_flattened", "shard_piece"]

_USE_FSDP2 = (
    "Shard with FSDP2 instead: torch.distributed.fsdp.fully_shard (accelerate: fsdp_version: 2 in the FSDP "
    "config; Trainer: --fsdp with fsdp_config {\"fsdp_version\": 2})."
)


# --------------------------------------------------------------------------------------------
# torch internals read by hf_weyl (the only place)
# --------------------------------------------------------------------------------------------


def _fsdp1_markers() -> tuple[str, type] | None:
    """(FSDP1's "flattened" attribute name, FlatParameter) — None when FSDP is not imported at all."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    try:
        from torch.distributed.fsdp._common_utils import FSDP_FLATTENED
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError as err:
        raise RuntimeError(
            f"AdamWeyl cannot tell FSDP1-flattened parameters apart in torch {torch.__version__} ({err}); hf_weyl "
            "reads torch.distributed.fsdp._common_utils.FSDP_FLATTENED and _flat_param.FlatParameter, tested with "
            "torch 2.13. Refusing to step rather than risk training FSDP1 shards as plain AdamW; install a tested "
            "torch version or report this."
        ) from None
    return FSDP_FLATTENED, FlatParameter


def fsdp1_flattened(t: Tensor) -> bool:
    """True for FSDP1's flat parameters and the 1-D views it makes of the original ones."""
    markers = _fsdp1_markers()
    if markers is None:
        return False
    attribute, flat_parameter = markers
    return isinstance(t, flat_parameter) or bool(getattr(t, attribute, False))


def _dtensor_type() -> type | None:
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


# --------------------------------------------------------------------------------------------
# placements → pieces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One parameter's piece: full matrix dims, this rank's element range, the group over which it is split
    (None: replicated, the whole matrix is here)."""

    dims: tuple[int, int]
    start: int
    numel: int
    group: Any
    rows: int  # rows of the full tensor on this rank (checked against the local shard)
    dim0: int


def _describe(p: Tensor) -> str:
    return f"a parameter of shape {tuple(p.shape)} with placements {tuple(p.placements)} on {p.device_mesh}"


def shard_piece(p: Any) -> _Piece:
    """The piece of DTensor ``p`` on this rank; raises for placements other than Shard(0) + Replicate."""
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = []
    for dim, placement in enumerate(p.placements):
        if type(placement) is Shard and placement.dim == 0:
            shard_dims.append(dim)
        elif type(placement) is not Replicate:
            raise RuntimeError(
                f"AdamWeyl: {_describe(p)} is sharded as {placement}; AdamWeyl computes σ1 of matrices split into "
                "row blocks (Shard(0), optionally with Replicate on other mesh dims, as FSDP2 and HSDP shard) and "
                "cannot map other placements (Shard(1) from shard_placement_fn, tensor parallelism, Partial, "
                "strided shards). Use fully_shard's default dim-0 sharding for the parameters AdamWeyl optimizes."
            )
    if len(shard_dims) > 1:
        raise RuntimeError(
            f"AdamWeyl: {_describe(p)} is sharded on dim 0 over several mesh dimensions; only one Shard(0) mesh "
            "dimension (FSDP2 / HSDP) is supported."
        )
    dims = matrix_dims(p.shape)
    rest = math.prod(p.shape[1:])  # elements per dim-0 row of the full tensor
    m0 = p.shape[0] if p.ndim else 1
    if not shard_dims:
        return _Piece(dims, 0, p.numel(), None, m0, m0)
    mesh_dim = shard_dims[0]
    mesh = p.device_mesh
    world, coord = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    chunk = -(-m0 // world)  # torch.chunk: ⌈m/world⌉ rows per rank, the last ranks may hold fewer or none
    first = min(coord * chunk, m0)
    rows = max(0, min(chunk, m0 - first))
    return _Piece(dims, first * rest, rows * rest, mesh.get_group(mesh_dim), rows, m0)


def _verify(params: list[Any], pieces: list[_Piece]) -> None:
    """First step: each local shard has the rows the chunk formula says, and the shard group's rows add up."""
    for p, piece in zip(params, pieces):
        local_rows = p.to_local().shape[0] if p.ndim else p.to_local().numel()
        if local_rows != piece.rows:
            raise RuntimeError(
                f"AdamWeyl (FSDP2): {_describe(p)} holds {local_rows} rows on this rank where dim-0 chunking gives "
                f"{piece.rows}; the sharding is not the one AdamWeyl maps (refusing to compute σ's of wrong pieces)."
            )
    by_group: dict[Any, list[int]] = {}
    for i, piece in enumerate(pieces):
        if piece.group is not None:
            by_group.setdefault(piece.group, []).append(i)
    for group, idx in by_group.items():
        rows = torch.tensor([pieces[i].rows for i in idx], dtype=torch.int64)
        all_reduce_(rows, group)
        for i, total in zip(idx, rows.tolist()):
            if total != pieces[i].dim0:
                raise RuntimeError(
                    f"AdamWeyl (FSDP2): the shards of {_describe(params[i])} hold {total} rows in all, not "
                    f"{pieces[i].dim0}; refusing to compute σ's of an inconsistent layout."
                )


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "placements") else t


# --------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------


@register_engine_adapter
class FSDP2Adapter:
    """Steps param groups of FSDP2 DTensors (and refuses FSDP1's flattened parameters)."""

    name = "fsdp2"

    def __init__(self) -> None:
        self._pieces: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter → _Piece, verified

    @classmethod
    def check_construction(cls, optimizer: AdamWeyl) -> None:
        pass  # FSDP1's flattened parameters are refused by claims(), which also runs at construction

    @classmethod
    def claims(cls, optimizer: AdamWeyl, group: dict[str, Any]) -> bool:
        flat = next((p for p in group["params"] if fsdp1_flattened(p)), None)
        if flat is not None:
            raise RuntimeError(
                f"AdamWeyl cannot optimize FSDP1 (FullyShardedDataParallel) parameters: it was given a flattened "
                f"tensor of shape {tuple(flat.shape)}, a 1-D piece of FSDP1's flat parameter, in which no weight "
                f"matrix is visible, so AdamW² would silently degrade to plain AdamW. {_USE_FSDP2}"
            )
        dtensor = _dtensor_type()
        if dtensor is None or not any(isinstance(p, dtensor) for p in group["params"]):
            return False
        for p in group["params"]:
            if isinstance(p, dtensor):
                shard_piece(p)  # refuses unsupported placements (at construction when possible)
        return True

    def _pieces_of(self, params: list[Tensor]) -> list[_Piece | None]:
        dtensor = _dtensor_type()
        new = [p for p in params if isinstance(p, dtensor) and p not in self._pieces]
        if new:  # the same new parameters on every rank (FSDP2 gives every rank every parameter)
            pieces = [shard_piece(p) for p in new]
            _verify(new, pieces)
            for p, piece in zip(new, pieces):
                self._pieces[p] = piece
        return [self._pieces.get(p) if isinstance(p, dtensor) else None for p in params]

    def step_group(self, optimizer: AdamWeyl, group: dict[str, Any]) -> CapStats | None:
        with_grad = [p for p in group["params"] if p.grad is not None]
        self._pieces_of(with_grad)
        mode = group["sigma_mode"]

        def sigma(params, weights, directions, w_vecs, u_vecs, iters):
            pieces = self._pieces_of(params)
            sigma_w = torch.zeros(len(params), dtype=torch.float32, device=w_vecs[0].device)
            sigma_u = torch.zeros_like(sigma_w)
            by_group: dict[Any, list[int]] = {}
            for i, piece in enumerate(pieces):
                by_group.setdefault(None if piece is None else piece.group, []).append(i)
            for pg, idx in by_group.items():  # insertion order: identical on every rank
                if pg is None:  # whole on this rank (replicated DTensor or a plain tensor)
                    views = [weights[i].reshape(matrix_dims(params[i].shape)) for i in idx]
                    dviews = [directions[i].reshape(matrix_dims(params[i].shape)) for i in idx]
                    sw = power_iteration_([v.float() for v in views], [w_vecs[i] for i in idx], iters.weight)
                    su = power_iteration_([v.float() for v in dviews], [u_vecs[i] for i in idx], iters.update)
                else:
                    where = Pieces(
                        tuple(pieces[i].dims for i in idx), tuple(pieces[i].start for i in idx),
                        tuple(pieces[i].numel for i in idx), pg,
                    )
                    sw, su = sharded_sigmas(
                        [weights[i] for i in idx], [directions[i] for i in idx], where,
                        [w_vecs[i] for i in idx], [u_vecs[i] for i in idx], iters, mode,
                    )
                index = torch.tensor(idx, device=sigma_w.device)
                sigma_w.index_copy_(0, index, sw.to(sigma_w.device))
                sigma_u.index_copy_(0, index, su.to(sigma_w.device))
            return sigma_w, sigma_u

        return optimizer.step_tensors(group, local=_local, sigma=sigma, engine=self.name)
