"""AdamW² on DTensor parameters — PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), tensor parallelism
(``torch.distributed.tensor.parallel``), their compositions — and the refusal of FSDP1.

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
  and caches it.

Any other layout made of ``Shard(d)``, FSDP2's strided shard (``_StridedShard``: ``fully_shard`` of a
tensor-parallel parameter) and ``Replicate`` on a mesh of any number of dims — ColwiseParallel's
``Shard(0)`` and RowwiseParallel's ``Shard(1)``, FSDP2 × TP's ``(_StridedShard(0), Shard(0))`` and
``(Shard(0), Shard(1))``, ``Shard(d ≥ 1)`` of >2-D tensors — is a 2-D *block* of the matrix view: the
global row positions (tensor dim 0) × the column positions (the row-major positions of dims 1.. over
their index sets), each computed per tensor dim by replaying the placements left to right with
``torch.chunk`` semantics (a strided shard first cuts the dim into ``split_factor`` pieces, chunks each
and keeps its chunk of every piece, as DTensor defines it). At the first step every block is verified:
its local shape, its index sets against DTensor's own split of a position tensor
(``distribute_tensor(arange, ..., src_data_rank=None)``: no communication), the group order the
all-gathers rely on, and the element count summed over the ranks that hold different blocks; the verdict
is reduced, so every rank raises together. σ's come from ``hf_weyl.distributed.block_sigmas``: partial
products reduced over the process group of each sharded mesh dim in turn (over the world in one
collective when the sharded dims are the whole mesh and the mesh is the world), never over Replicate
dims (replicas are not double counted). ``Partial`` and unknown placements are refused with the
parameter's shape and placements.

FSDP1 (``FullyShardedDataParallel``) hands the optimizer 1-D flat parameters or 1-D views of them: no
matrix is visible, and stepping them would silently train plain AdamW. Such parameters are refused at
construction (and at any later step) with a message pointing to FSDP2.

The private torch attributes this reads (FSDP1's markers, DTensor's strided shard and its ``split_factor``)
are read in ``hf_weyl.integrations.internals.torch_distributed`` only, each failing closed.
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..core.layout import Block, Part, RowPiece, StepPlan, Unit
from ..core.optimizer import AdamWeyl, register_engine_adapter
from ..distributed.collectives import all_reduce_
from ..distributed.sigma import LAYOUT_SIGMA, index_len, matrix_dims
from .internals.torch_distributed import fsdp1_markers, split_factor
from .internals.torch_distributed import strided_shard as _strided_shard

__all__ = ["FSDP2Adapter", "dtensor_layout", "fsdp1_flattened", "shard_block", "shard_piece"]

_LAST_LISTS = 16  # lists of parameters whose layouts FSDP2Adapter._parts_of keeps (one per group and σ mode)

_USE_FSDP2 = (
    "Shard with FSDP2 instead: torch.distributed.fsdp.fully_shard (accelerate: fsdp_version: 2 in the FSDP "
    "config; Trainer: --fsdp with fsdp_config {\"fsdp_version\": 2})."
)


def fsdp1_flattened(t: Tensor) -> bool:
    """True for FSDP1's flat parameters and the 1-D views it makes of the original ones."""
    markers = fsdp1_markers()
    if markers is None:
        return False
    attribute, flat_parameter = markers
    return isinstance(t, flat_parameter) or bool(getattr(t, attribute, False))


def _split_factor(placement: Any, p: Any) -> int:
    try:
        return split_factor(placement)
    except RuntimeError as err:
        raise RuntimeError(f"AdamWeyl: {_describe(p)}: {err}") from None


_DTENSOR: list[type] = []  # DTensor, once torch.distributed.tensor is imported


def _dtensor_type() -> type | None:
    if _DTENSOR:
        return _DTENSOR[0]
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet (not imported here: it is slow)
        return None
    from torch.distributed.tensor import DTensor

    _DTENSOR.append(DTensor)
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


@dataclass(frozen=True)
class _Block:
    """One parameter's 2-D block: full matrix dims, this rank's global row / column positions, the local shape
    they imply, and the (group, mesh dims) stages the partial products are reduced over."""

    dims: tuple[int, int]
    rows: Any  # slice or int64 tensor
    cols: Any
    local_shape: tuple[int, ...]
    stages: tuple[tuple[Any, tuple[int, ...]], ...]
    mesh: Any
    placements: tuple[Any, ...]
    shape: tuple[int, ...]

    @property
    def groups(self) -> tuple[Any, ...]:
        return tuple(g for g, _ in self.stages)


def _row_piece_layout(p: Any) -> bool:
    """Shard(0) on at most one mesh dim, Replicate elsewhere: the row pieces of :func:`shard_piece`."""
    from torch.distributed.tensor import Replicate, Shard

    shards = [pl for pl in p.placements if type(pl) is Shard and pl.dim == 0]
    return len(shards) <= 1 and all(type(pl) is Replicate or (type(pl) is Shard and pl.dim == 0) for pl in p.placements)


def _chunk(idx: Tensor, k: int, c: int) -> Tensor:
    """Chunk ``c`` of ``k`` of ``idx`` with ``torch.chunk`` semantics (⌈len/k⌉ each, the last ones smaller or empty)."""
    size = -(-idx.numel() // k)
    return idx[min(c * size, idx.numel()) : min((c + 1) * size, idx.numel())]


def _dim_positions(p: Any, dim: int, coord: Sequence[int]) -> Tensor:
    """Global positions along tensor dim ``dim`` held at mesh coordinate ``coord``: the placements replayed left
    to right, as DTensor shards."""
    from torch.distributed.tensor import Shard

    strided = _strided_shard()
    mesh_shape = p.device_mesh.shape
    idx = torch.arange(p.shape[dim])
    for mesh_dim, pl in enumerate(p.placements):
        if getattr(pl, "dim", None) is None or pl.dim % p.ndim != dim:
            continue
        if type(pl) is Shard:
            idx = _chunk(idx, mesh_shape[mesh_dim], coord[mesh_dim])
        elif strided is not None and type(pl) is strided:
            factor = _split_factor(pl, p)
            pieces = [_chunk(idx, factor, j) for j in range(factor)]
            idx = torch.cat([_chunk(piece, mesh_shape[mesh_dim], coord[mesh_dim]) for piece in pieces])
    return idx


def _compact(idx: Tensor) -> Any:
    """A range as a slice, other index sets as they are."""
    if idx.numel() == 0:
        return slice(0, 0)
    first = int(idx[0])
    if torch.equal(idx, torch.arange(first, first + idx.numel())):
        return slice(first, first + idx.numel())
    return idx


def _block_at(p: Any, coord: Sequence[int]) -> tuple[Any, Any, tuple[int, ...]]:
    """(rows, cols, local shape) of ``p``'s block at mesh coordinate ``coord``."""
    per_dim = [_dim_positions(p, d, coord) for d in range(p.ndim)]
    local_shape = tuple(int(i.numel()) for i in per_dim)
    if p.ndim == 1:
        return slice(0, 1), _compact(per_dim[0]), local_shape
    cols = torch.zeros(1, dtype=torch.int64)
    for d in range(1, p.ndim):
        cols = (cols[:, None] * p.shape[d] + per_dim[d][None, :]).reshape(-1)
    return _compact(per_dim[0]), _compact(cols), local_shape


def _stages(mesh: Any, shard_dims: tuple[int, ...]) -> tuple[tuple[Any, tuple[int, ...]], ...]:
    """The groups partial products are summed over: the world at once when the sharded mesh dims are the whole
    mesh and the mesh is the world in rank order, else each sharded mesh dim's group in turn."""
    if (
        len(shard_dims) > 1
        and len(shard_dims) == mesh.ndim
        and mesh.mesh.flatten().tolist() == list(range(dist.get_world_size()))
    ):
        return ((dist.group.WORLD, shard_dims),)
    return tuple((mesh.get_group(d), (d,)) for d in shard_dims)


def shard_block(p: Any) -> _Block:
    """The 2-D block of DTensor ``p`` on this rank (any mix of Shard, strided shards and Replicate); raises for
    ``Partial`` and placements it does not know."""
    from torch.distributed.tensor import Replicate, Shard

    strided = _strided_shard()
    for placement in p.placements:
        known = type(placement) in (Shard, Replicate) or (strided is not None and type(placement) is strided)
        if not known:
            raise RuntimeError(
                f"AdamWeyl: {_describe(p)} has the placement {placement!r}, which AdamWeyl cannot map to a block of "
                "the full matrix (it maps Shard(d), FSDP2's strided shard and Replicate; a Partial tensor holds "
                "unreduced partial sums, not a block of the weight). Redistribute such parameters to Shard or "
                "Replicate placements before optimizing them."
            )
        if strided is not None and type(placement) is strided:
            _split_factor(placement, p)
    if p.ndim == 0:
        raise RuntimeError(f"AdamWeyl: {_describe(p)} is a sharded 0-d tensor; it cannot be cut into blocks.")
    mesh = p.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise RuntimeError(f"AdamWeyl: this rank is not in the mesh of {_describe(p)}.")
    shard_dims = tuple(d for d, pl in enumerate(p.placements) if type(pl) is not Replicate)
    rows, cols, local_shape = _block_at(p, coord)
    return _Block(matrix_dims(p.shape), rows, cols, local_shape, _stages(mesh, shard_dims), mesh,
                  tuple(p.placements), tuple(p.shape))


def dtensor_layout(p: Any) -> _Piece | _Block:
    """How DTensor ``p`` is split: a row piece (FSDP2, HSDP, dim-0 TP) or a 2-D block (anything else it maps)."""
    return shard_piece(p) if _row_piece_layout(p) else shard_block(p)


def _unravel(j: int, sizes: Sequence[int]) -> list[int]:
    out = []
    for k in reversed(sizes):
        out.append(j % k)
        j //= k
    return out[::-1]


def _grid_coords(block: _Block, coord: Sequence[int]) -> list[list[int]]:
    """Mesh coordinates of the ranks whose blocks the all-gathers over ``block.stages`` concatenate, in order."""
    shape = block.mesh.shape
    sizes = [math.prod(shape[d] for d in dims) for _, dims in block.stages]
    out = []
    for j in range(math.prod(sizes)):
        c = list(coord)
        for (_, dims), k in zip(block.stages, sizes):
            j, here = divmod(j, k)
            for d, v in zip(dims, _unravel(here, [shape[d] for d in dims])):
                c[d] = v
        out.append(c)
    return out


def _grid(p: Any, block: _Block) -> tuple[tuple[Any, Any], ...]:
    coord = block.mesh.get_coordinate()
    return tuple(_block_at(p, c)[:2] for c in _grid_coords(block, coord))


def _block_problem(p: Any, block: _Block) -> str | None:
    """Why this rank's block of ``p`` is not what AdamWeyl computed (None: it is)."""
    local = tuple(p.to_local().shape)
    if local != block.local_shape:
        return f"the local shard has shape {local}, not the {block.local_shape} the placements give"
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    strided = _strided_shard()
    coord = block.mesh.get_coordinate()
    for dim in range(p.ndim):
        placements = []
        for pl in p.placements:
            if type(pl) is Shard and pl.dim % p.ndim == dim:
                placements.append(Shard(0))
            elif strided is not None and type(pl) is strided and pl.dim % p.ndim == dim:
                placements.append(strided(0, split_factor=_split_factor(pl, p)))
            else:
                placements.append(Replicate())
        if all(type(pl) is Replicate for pl in placements):
            continue
        try:
            theirs = distribute_tensor(torch.arange(p.shape[dim]), block.mesh, placements, src_data_rank=None).to_local()
        except Exception as err:  # noqa: BLE001 - reported below, on every rank
            return f"DTensor could not split a position tensor as {tuple(placements)} ({err})"
        if not torch.equal(theirs.cpu(), _dim_positions(p, dim, coord)):
            return f"DTensor places positions {theirs.tolist()} of dim {dim} here, AdamWeyl computed others"
    for group, dims in block.stages:
        want = [int(block.mesh.mesh[tuple(c)]) for c in _grid_coords(
            _Block(block.dims, block.rows, block.cols, block.local_shape, ((group, dims),), block.mesh,
                   block.placements, block.shape), coord)]
        if dist.get_process_group_ranks(group) != want:
            return f"the ranks of a reduction group are {dist.get_process_group_ranks(group)}, not the mesh's {want}"
    return None


def _verify_blocks(params: list[Any], blocks: list[_Block]) -> None:
    """First step: every block is the one the placements give, and each matrix's blocks hold all its elements;
    the verdict is summed over the groups, so every rank raises (or none does)."""
    problems = [_block_problem(p, b) for p, b in zip(params, blocks)]
    by_stages: dict[Any, list[int]] = {}
    for i, b in enumerate(blocks):
        by_stages.setdefault(b.stages, []).append(i)
    for stages, idx in by_stages.items():
        counts = torch.tensor([[index_len(blocks[i].rows) * index_len(blocks[i].cols), problems[i] is not None]
                               for i in idx], dtype=torch.int64)
        for group, _ in stages:
            all_reduce_(counts, group)
        for i, (total, bad) in zip(idx, counts.tolist()):
            if bad or total != math.prod(blocks[i].dims):
                reason = problems[i] or ("another rank's block differs from its placements" if bad else
                                         f"the blocks hold {total} elements in all, not {math.prod(blocks[i].dims)}")
                raise RuntimeError(
                    f"AdamWeyl (DTensor blocks): {_describe(params[i])}: {reason}; refusing to compute σ's of a layout "
                    "it did not map exactly."
                )


def _align_grads(params: list[Tensor]) -> None:
    """Give every DTensor gradient its parameter's placements (the elementwise step pairs local shards). Tensor
    parallelism can hand back another layout — a RowwiseParallel embedding's gradient comes back Replicate(),
    a hand-written op's may be Partial() — so it is redistributed (Replicate → Shard is a local slice; Partial
    is reduced: a collective, made by every rank for the same parameters in the same order)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return
    for p in params:
        g = p.grad
        if isinstance(p, dtensor) and isinstance(g, dtensor) and (
            g.placements != p.placements or (g.device_mesh is not p.device_mesh and g.device_mesh != p.device_mesh)
        ):
            p.grad = g.redistribute(p.device_mesh, p.placements)
        elif isinstance(p, dtensor) and not isinstance(g, dtensor):
            raise RuntimeError(
                f"AdamWeyl: {_describe(p)} has a plain-tensor gradient of shape {tuple(g.shape)}; a DTensor parameter "
                "needs a DTensor gradient (its layout tells which part of the full gradient this rank holds)."
            )


def _local(t: Tensor) -> Tensor:
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


# --------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------


@register_engine_adapter
class FSDP2Adapter:
    """Steps param groups of FSDP2 DTensors (and refuses FSDP1's flattened parameters)."""

    name = "fsdp2"

    def __init__(self) -> None:
        self._pieces: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter → _Piece or _Block, verified
        self._grids: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter → every rank's block (gather mode)
        self._core: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter → (σ mode, its core layout), made once
        self._last: dict[tuple, tuple[list[weakref.ref], list]] = {}  # (mode, ids) → (weak refs, core layouts)

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
                dtensor_layout(p)  # refuses unsupported placements (at construction when possible)
        return True

    def _pieces_of(self, params: list[Tensor]) -> list[_Piece | _Block | None]:
        dtensor = _dtensor_type()
        new = [p for p in params if isinstance(p, dtensor) and p not in self._pieces]
        if new:  # the same new parameters on every rank (FSDP2 and TP give every rank every parameter)
            layouts = [dtensor_layout(p) for p in new]
            rows = [i for i, lay in enumerate(layouts) if isinstance(lay, _Piece)]
            blocks = [i for i, lay in enumerate(layouts) if isinstance(lay, _Block)]
            _verify([new[i] for i in rows], [layouts[i] for i in rows])
            _verify_blocks([new[i] for i in blocks], [layouts[i] for i in blocks])
            for p, layout in zip(new, layouts):
                self._pieces[p] = layout
        return [self._pieces.get(p) if isinstance(p, dtensor) else None for p in params]

    def _grid_of(self, p: Tensor, block: _Block) -> tuple[tuple[Any, Any], ...]:
        if p not in self._grids:
            self._grids[p] = _grid(p, block)
        return self._grids[p]

    def _core_layout(self, p: Tensor, lay: _Piece | _Block | None, mode: str) -> RowPiece | Block | None:
        """The core's layout of a parameter's matrix: None when it is whole here (replicated, or a plain tensor)."""
        if isinstance(lay, _Block):
            return Block(lay.dims, lay.rows, lay.cols, lay.groups, self._grid_of(p, lay) if mode == "gather" else None)
        if lay is None or lay.group is None:
            return None
        return RowPiece(lay.dims, lay.start, lay.numel, lay.group)

    def describe(self, optimizer: AdamWeyl, group: dict[str, Any]) -> StepPlan:
        """One unit per parameter with a gradient: its local shard, with its row piece or block (verified on every
        rank at its first step); the moments stay DTensors (DCP reshards them), the maths runs on local shards."""
        with_grad = [p for p in group["params"] if p.grad is not None]
        _align_grads(with_grad)
        mode = group["sigma_mode"]
        units = [Unit(p, _local(p), _local(p.grad), [part]) for p, part in zip(with_grad, self._parts_of(with_grad, mode))]
        return StepPlan(units, engine=self.name, sigma=LAYOUT_SIGMA, local=_local)

    def _parts_of(self, params: list[Tensor], mode: str) -> list[Part]:
        """Each parameter's Part; its matrix's layout in the core's terms is made at its first step in σ ``mode``
        (kept without a reference to the parameter, which stays collectable). The layouts of the last lists of
        parameters asked for are kept too, with weak references to check that they are the same objects: a group
        asks with the same parameters every step, and one look-up per group is cheaper than one per parameter."""
        key = (mode, tuple(map(id, params)))
        last = self._last.get(key)
        if last is not None and all(ref() is p for ref, p in zip(last[0], params)):
            cores = last[1]
        else:
            kept = [self._core.get(p) for p in params]
            if not all(k is not None and k[0] == mode for k in kept):
                kept = [(mode, self._core_layout(p, lay, mode)) for p, lay in zip(params, self._pieces_of(params))]
                for p, k in zip(params, kept):
                    self._core[p] = k
            cores = [k[1] for k in kept]
            if len(self._last) >= _LAST_LISTS:
                self._last.clear()
            self._last[key] = ([weakref.ref(p) for p in params], cores)
        return [Part(p, p.shape, core) for p, core in zip(params, cores)]
