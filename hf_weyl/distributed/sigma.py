"""σ1 of matrices whose elements are split into contiguous row-major pieces across a process group.

Matrix i, viewed as (m_i × n_i) and flattened row-major, has elements [s_i, s_i + c_i) on this rank
(c_i = 0: none). DeepSpeed ZeRO's flat partitions and FSDP2's dim-0 shards are both of this form; the
engine adapters (``hf_weyl.integrations``) only translate their layout into :class:`Pieces`.

* ``vector_reduce`` (default): distributed power iteration. With B = A if n ≤ m else Aᵀ and a unit
  x ∈ R^{min(m,n)} identical on every rank, each rank multiplies only its piece, Bx = Σ_r B_r x and
  Bᵀy = Σ_r B_rᵀ y, and the partial vectors of *all* matrices are summed with one all-reduce per
  half-step: 2 all-reduces of Σ_j (m_j + n_j) floats per iteration (W and U together: 2(m + n)).
* ``gather``: all-gather every piece, then the single-process power iteration on the full matrices:
  1 all-gather of the local pieces (≈ 2N/world floats per rank) plus a tiny one of their addresses.

Matrices cut into 2-D blocks (tensor parallelism: a row *and* column block per rank, possibly index sets
rather than ranges, composed over several mesh dimensions) go through :class:`Blocks` and
:func:`block_sigmas` instead: the same power steps, each block multiplied into its rows / columns of the
m- and n-vectors, the partial vectors summed over the process groups that split the matrices (one after
the other: together they span the ranks that hold different blocks; replica ranks are not summed over).

Both give the single-process σ's (``gather`` bit for bit, ``vector_reduce`` up to summation order),
with the same scale-safe power steps (``hf_weyl.core.power_iteration.power_steps_``). Every rank makes
the same collectives in the same order (a rank without a piece contributes zeros), and the only
decisions (keep a vector where σ is not finite and positive) come from reduced values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.layout import SIGMA_MODES, Block, RowPiece
from ..core.power_iteration import PowerIters, Segments, matrix_dims, power_iteration_, power_steps_
from .collectives import COMM_STATS, all_gather, all_reduce_, all_reduce_start

__all__ = [
    "COMM_STATS",
    "LAYOUT_SIGMA",
    "SIGMA_MODES",
    "Blocks",
    "Pieces",
    "block_comm_bytes_per_step",
    "block_sigmas",
    "comm_bytes_per_step",
    "layout_sigmas",
    "matrix_dims",
    "sharded_sigmas",
    "tp_comm_bytes_per_step",
]

@dataclass(frozen=True)
class Pieces:
    """Where this rank's pieces of a list of matrices are; the same matrices, in the same order, on every
    rank of ``group``: matrix i is ``dims[i]`` = (m, n), and this rank holds the elements
    [``starts[i]``, ``starts[i] + numels[i]``) of its row-major flattening."""

    dims: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]
    numels: tuple[int, ...]
    group: Any

    def __post_init__(self) -> None:
        if not len(self.dims) == len(self.starts) == len(self.numels):
            raise ValueError("Pieces: dims, starts and numels must have one entry per matrix")
        for (m, n), s, c in zip(self.dims, self.starts, self.numels):
            if c and not (0 <= s and s + c <= m * n):
                raise ValueError(f"Pieces: elements [{s}, {s + c}) do not lie in a {m}×{n} matrix")


def sharded_sigmas(
    weights: list[Tensor],
    updates: list[Tensor],
    pieces: Pieces,
    weight_vectors: list[Tensor],
    update_vectors: list[Tensor],
    iters: PowerIters | int,
    mode: str = "vector_reduce",
) -> tuple[Tensor, Tensor]:
    """(σ1(W_i), σ1(U_i)) of the distributed matrices whose local pieces (1-D, ``pieces.numels[i]`` long)
    are ``weights[i]`` and ``updates[i]``; the replicated fp32 vectors are updated in place (warm start).
    A collective call: every rank of ``pieces.group`` must call it with the same matrices and iterations."""
    if mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {mode!r}; valid: {SIGMA_MODES}")
    iters = PowerIters(iters, iters) if isinstance(iters, int) else iters
    k = len(pieces.dims)
    w_flat, u_flat = [t.reshape(-1) for t in weights], [t.reshape(-1) for t in updates]
    if mode == "gather":
        fulls = _gather_matrices(w_flat + u_flat, Pieces(pieces.dims * 2, pieces.starts * 2, pieces.numels * 2, pieces.group))
        # W's, then U's: the same power_iteration_ calls as on one device, so σ's are bit for bit the same.
        return (power_iteration_(fulls[:k], weight_vectors, iters.weight),
                power_iteration_(fulls[k:], update_vectors, iters.update))
    both = Pieces(pieces.dims * 2, pieces.starts * 2, pieces.numels * 2, pieces.group)
    return _w_and_u(_sigma_vector_reduce, pieces, both, w_flat, u_flat, weight_vectors, update_vectors, iters)


def _w_and_u(run, layout, both, weights, updates, weight_vectors, update_vectors, iters: PowerIters):
    """(σ_W, σ_U) by ``run(matrices, layout, vectors, iters)``: W's and U's in the same collectives (``both``: the
    layout listed twice) when they take the same number of iterations, else one after the other."""
    if iters.weight == iters.update:
        sigma = run(weights + updates, both, [*weight_vectors, *update_vectors], iters.weight)
        return sigma[: len(weights)], sigma[len(weights) :]
    return run(weights, layout, weight_vectors, iters.weight), run(updates, layout, update_vectors, iters.update)


def _run_power_steps(products, vectors: list[Tensor], short: Segments, long: Segments, tall: list[bool],
                     iters: int) -> Tensor:
    """``iters`` power steps (:func:`hf_weyl.core.power_iteration.power_steps_`) with ``products(vectors, segments,
    a_times)`` summed over the ranks: B x is A x for tall matrices and Aᵀ x for wide ones, Bᵀ y the other way. The
    vectors are updated in place; returns σ."""
    sigma, x = power_steps_(
        lambda x: products(list(x.split(short.sizes)), long, tall),
        lambda y: products(list(y.split(long.sizes)), short, [not t for t in tall]),
        torch.cat(vectors),
        short,
        long,
        iters,
    )
    torch._foreach_copy_(vectors, list(x.split(short.sizes)))
    return sigma


# --------------------------------------------------------------------------------------------
# products of a contiguous row-major piece
# --------------------------------------------------------------------------------------------


def _split_piece(piece: Tensor, start: int, n: int):
    """Split a row-major piece starting at element ``start`` of an (m×n) matrix into
    (head row, head col, head values), (first full row, full rows as q×n), (tail row, tail values)."""
    count = piece.numel()
    h = min((-start) % n, count)
    r0, c0 = divmod(start, n)
    rest = piece[h:]
    r1 = (start + h) // n
    q = rest.numel() // n
    return (r0, c0, piece[:h]), (r1, rest[: q * n].view(q, n)), (r1 + q, rest[q * n :])


def _matvec(split, m: int, v: Tensor) -> Tensor:
    """Partial A·v (length m) from this rank's piece of A."""
    out = torch.zeros(m, dtype=v.dtype, device=v.device)
    _add_matvec(out, split, v)
    return out


def _rmatvec(split, n: int, w: Tensor) -> Tensor:
    """Partial Aᵀ·w (length n) from this rank's piece of A."""
    out = torch.zeros(n, dtype=w.dtype, device=w.device)
    _add_rmatvec(out, split, w)
    return out


def _add_matvec(out: Tensor, split, v: Tensor) -> None:
    """out (length m) += this rank's part of A·v."""
    (r0, c0, head), (r1, mid), (r2, tail) = split
    if head.numel():
        out[r0] += torch.dot(head, v[c0 : c0 + head.numel()])
    if mid.shape[0]:
        out[r1 : r1 + mid.shape[0]].addmv_(mid, v)
    if tail.numel():
        out[r2] += torch.dot(tail, v[: tail.numel()])


def _add_rmatvec(out: Tensor, split, w: Tensor) -> None:
    """out (length n) += this rank's part of Aᵀ·w."""
    (r0, c0, head), (r1, mid), (r2, tail) = split
    if head.numel():
        out[c0 : c0 + head.numel()] += head * w[r0]
    if mid.shape[0]:
        out.addmv_(mid.t(), w[r1 : r1 + mid.shape[0]])
    if tail.numel():
        out[: tail.numel()] += tail * w[r2]


def _sigma_vector_reduce(pieces: list[Tensor], where: Pieces, vectors: list[Tensor], iters: int) -> Tensor:
    """σ1 of each distributed matrix by power iteration (:func:`hf_weyl.core.power_iteration.power_steps_`):
    each rank multiplies its pieces into the concatenated vectors, which one all-reduce per half-step sums."""
    device = vectors[0].device
    pieces = [p.float() for p in pieces]  # fp32 math (a no-op for fp32 pieces)
    splits = [_split_piece(p, s, n) for p, s, (m, n) in zip(pieces, where.starts, where.dims)]
    tall = [n <= m for m, n in where.dims]  # B = A (x ∈ R^n) if tall else Aᵀ (x ∈ R^m)
    short = Segments([n if t else m for (m, n), t in zip(where.dims, tall)], device)
    long = Segments([m if t else n for (m, n), t in zip(where.dims, tall)], device)

    def products(vecs: list[Tensor], segments: Segments, a_times: list[bool]) -> Tensor:
        out = torch.zeros(segments.total, dtype=torch.float32, device=device)
        for seg, split, vec, plain in zip(out.split(segments.sizes), splits, vecs, a_times):
            (_add_matvec if plain else _add_rmatvec)(seg, split, vec)
        all_reduce_(out, where.group)
        return out

    return _run_power_steps(products, vectors, short, long, tall, iters)


def _gather_matrices(pieces: list[Tensor], where: Pieces) -> list[Tensor]:
    """The full (m × n) fp32 matrices, all-gathered from every rank's pieces."""
    device = pieces[0].device if pieces else None
    meta = torch.tensor([[s, p.numel()] for s, p in zip(where.starts, pieces)], dtype=torch.int64, device=device)
    metas = all_gather(meta.reshape(-1, 2), where.group)
    sizes = [int(m[:, 1].sum()) for m in metas]
    local = torch.cat(pieces).to(device=device, dtype=torch.float32) if pieces else torch.zeros(0, device=device)
    local = torch.cat([local, local.new_zeros(max(sizes) - local.numel())])
    chunks = all_gather(local, where.group)
    fulls = [torch.zeros(m * n, dtype=torch.float32, device=device) for m, n in where.dims]
    for rank_meta, chunk in zip(metas, chunks):
        pos = 0
        for full, (start, numel) in zip(fulls, rank_meta.tolist()):
            full[start : start + numel] = chunk[pos : pos + numel]
            pos += numel
    return [f.view(m, n) for f, (m, n) in zip(fulls, where.dims)]


def comm_bytes_per_step(
    shapes: list[tuple[int, ...]], world: int, mode: str, *, power_iters: int = 1, bytes_per_float: int = 4,
    fused: bool = False,
) -> dict[str, float]:
    """Payload bytes one rank hands to the σ collectives per optimizer step for these capped tensors (one
    call of :func:`sharded_sigmas`), and the bytes it sends on the wire with ring algorithms. ``fused``: the fused
    CPU step (``vector_reduce``, warm steps, CPU fp32 shards or ZeRO partitions), whose second all-reduce carries
    one float more, the kept product's check."""
    if mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {mode!r}; valid: {SIGMA_MODES}")
    if not shapes:
        return {"payload": 0, "wire": 0, "collectives": 0}
    if mode == "vector_reduce":
        payload = sum(2 * (m + n) for m, n in map(matrix_dims, shapes)) * power_iters * bytes_per_float
        payload += 4 if fused else 0
        return {"payload": payload, "wire": 2 * (world - 1) / world * payload, "collectives": 2 * power_iters}
    numel = sum(torch.Size(s).numel() for s in shapes)
    local = 2 * numel / world * bytes_per_float  # W and U pieces (≈ evenly split)
    meta = 16 * len(shapes) * 2
    return {"payload": local + meta, "wire": (world - 1) * (local + meta), "collectives": 2}


# --------------------------------------------------------------------------------------------
# 2-D blocks (tensor parallelism, FSDP2 × TP)
# --------------------------------------------------------------------------------------------

#: Global row or column positions of a block: a range (``slice`` with step 1) or a 1-D int64 tensor.
Index = Any


def index_len(ix: Index) -> int:
    return ix.stop - ix.start if isinstance(ix, slice) else int(ix.numel())


@dataclass(frozen=True)
class Blocks:
    """Where this rank's blocks of a list of matrices are. Matrix i is ``dims[i]`` = (m, n); this rank holds
    the block ``rows[i]`` × ``cols[i]`` (global positions, see :data:`Index`), its local tensor being that block
    row-major (``rows`` in order, ``cols`` in order). The blocks of the ranks that differ on ``groups`` tile each
    matrix exactly once; summing a partial vector over ``groups[0]``, then ``groups[1]``, ... sums it over them
    (ranks that hold the same block — replicas — are in none of the groups together).

    ``grid`` (needed by ``sigma_mode="gather"`` only): for every rank of that tiling, in the order a
    sequence of all-gathers over ``groups`` concatenates their payloads (slot j = Σ_s c_s Π_{t<s} |groups[t]|,
    c_s the rank's position in ``groups[s]``), its (rows, cols) of each matrix."""

    dims: tuple[tuple[int, int], ...]
    rows: tuple[Index, ...]
    cols: tuple[Index, ...]
    groups: tuple[Any, ...]
    grid: tuple[tuple[tuple[Index, Index], ...], ...] | None = None

    def __post_init__(self) -> None:
        if not len(self.dims) == len(self.rows) == len(self.cols):
            raise ValueError("Blocks: dims, rows and cols must have one entry per matrix")
        if not self.groups:
            raise ValueError("Blocks: at least one process group splits the matrices")


def _take(v: Tensor, ix: Index) -> Tensor:
    return v[ix] if isinstance(ix, slice) else v.index_select(0, ix.to(v.device))


def _add_at(out: Tensor, ix: Index, values: Tensor) -> None:
    if isinstance(ix, slice):
        out[ix] += values
    else:
        out.index_add_(0, ix.to(out.device), values)


def block_sigmas(
    weights: list[Tensor],
    updates: list[Tensor],
    blocks: Blocks,
    weight_vectors: list[Tensor],
    update_vectors: list[Tensor],
    iters: PowerIters | int,
    mode: str = "vector_reduce",
) -> tuple[Tensor, Tensor]:
    """(σ1(W_i), σ1(U_i)) of the matrices whose local blocks (any shape with ``index_len(rows[i]) ×
    index_len(cols[i])`` elements) are ``weights[i]`` and ``updates[i]``; the replicated fp32 vectors are
    updated in place. A collective call: every rank of ``blocks.groups`` calls it with the same matrices."""
    if mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {mode!r}; valid: {SIGMA_MODES}")
    iters = PowerIters(iters, iters) if isinstance(iters, int) else iters
    k = len(blocks.dims)
    shape = [(index_len(r), index_len(c)) for r, c in zip(blocks.rows, blocks.cols)]
    w_mats = [t.reshape(q) for t, q in zip(weights, shape)]
    u_mats = [t.reshape(q) for t, q in zip(updates, shape)]
    if mode == "gather":
        if blocks.grid is None:
            raise ValueError("Blocks: sigma_mode='gather' needs the grid of every rank's blocks")
        grid = tuple(slot * 2 for slot in blocks.grid)
        fulls = _gather_blocks(w_mats + u_mats, blocks.dims * 2, grid, blocks.groups)
        return (power_iteration_(fulls[:k], weight_vectors, iters.weight),
                power_iteration_(fulls[k:], update_vectors, iters.update))
    both = Blocks(blocks.dims * 2, blocks.rows * 2, blocks.cols * 2, blocks.groups)
    return _w_and_u(_sigma_blocks, blocks, both, w_mats, u_mats, weight_vectors, update_vectors, iters)


def _sigma_blocks(mats: list[Tensor], where: Blocks, vectors: list[Tensor], iters: int) -> Tensor:
    """Power steps on block-distributed matrices: Bx and Bᵀy are sums over the blocks, each block's product
    added into its rows (or columns) of the concatenated vectors, summed over ``where.groups`` in turn."""
    device = vectors[0].device
    mats = [b.to(device=device, dtype=torch.float32) for b in mats]
    tall = [n <= m for m, n in where.dims]  # B = A (x ∈ R^n) if tall else Aᵀ (x ∈ R^m)
    short = Segments([n if t else m for (m, n), t in zip(where.dims, tall)], device)
    long = Segments([m if t else n for (m, n), t in zip(where.dims, tall)], device)

    def products(vecs: list[Tensor], segments: Segments, a_times: list[bool]) -> Tensor:
        out = torch.zeros(segments.total, dtype=torch.float32, device=device)
        for seg, mat, r, c, vec, plain in zip(out.split(segments.sizes), mats, where.rows, where.cols, vecs, a_times):
            if mat.numel() == 0:
                continue
            if plain:  # A v: rows r of the result get block · v[c]
                _add_at(seg, r, mat @ _take(vec, c))
            else:  # Aᵀ w: columns c get blockᵀ · w[r]
                _add_at(seg, c, mat.t() @ _take(vec, r))
        for group in where.groups:
            all_reduce_(out, group)
        return out

    return _run_power_steps(products, vectors, short, long, tall, iters)


def _as_positions(ix: Index) -> Tensor:
    return torch.arange(ix.start, ix.stop) if isinstance(ix, slice) else ix.cpu()


def _gather_blocks(mats, dims, grid, groups) -> list[Tensor]:
    """The full fp32 matrices, from every rank's blocks, all-gathered over ``groups`` in turn (payloads padded to
    the largest rank's, whose size every rank knows from ``grid``: no metadata travels)."""
    device = mats[0].device
    sizes = [sum(index_len(r) * index_len(c) for r, c in slot) for slot in grid]
    width = max(sizes)
    payload = torch.cat([b.reshape(-1).float() for b in mats]) if mats else torch.zeros(0, device=device)
    payload = torch.cat([payload, payload.new_zeros(width - payload.numel())])
    for group in groups:
        payload = torch.cat(all_gather(payload, group))
    fulls = [torch.zeros(m, n, dtype=torch.float32, device=device) for m, n in dims]
    for j, slot in enumerate(grid):
        pos = j * width
        for full, (r, c) in zip(fulls, slot):
            q, w = index_len(r), index_len(c)
            block = payload[pos : pos + q * w].view(q, w)
            pos += q * w
            if not q * w:
                continue
            if isinstance(r, slice) and isinstance(c, slice):
                full[r, c] = block
            else:
                full[_as_positions(r).to(device)[:, None], _as_positions(c).to(device)[None, :]] = block
    return fulls


def block_comm_bytes_per_step(
    shapes: list[tuple[int, ...]],
    group_sizes: Sequence[int],
    mode: str,
    *,
    power_iters: int = 1,
    bytes_per_float: int = 4,
) -> dict[str, float]:
    """Payload bytes one rank hands to the σ collectives per optimizer step for these block-distributed tensors
    (one call of :func:`block_sigmas` with ``Blocks.groups`` of these sizes), and the bytes it sends on the wire
    with ring algorithms. ``vector_reduce``: every half-step reduces the concatenated vectors over each group
    in turn; ``gather``: all-gathers over each group in turn, the payload growing by that group's size."""
    if mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {mode!r}; valid: {SIGMA_MODES}")
    if not shapes:
        return {"payload": 0, "wire": 0, "collectives": 0}
    stages = len(group_sizes)
    if mode == "vector_reduce":
        vectors = sum(2 * (m + n) for m, n in map(matrix_dims, shapes)) * power_iters * bytes_per_float
        wire = sum(2 * (k - 1) / k * vectors for k in group_sizes)
        return {"payload": vectors * stages, "wire": wire, "collectives": 2 * power_iters * stages}
    world = 1
    for k in group_sizes:
        world *= k
    local = 2 * sum(torch.Size(s).numel() for s in shapes) / world * bytes_per_float  # W and U blocks (≈ even)
    payload, wire, held = 0.0, 0.0, local
    for k in group_sizes:
        payload += held
        wire += (k - 1) * held
        held *= k
    return {"payload": payload, "wire": wire, "collectives": stages}


def tp_comm_bytes_per_step(
    colwise: list[tuple[int, ...]],
    rowwise: list[tuple[int, ...]],
    *,
    dp: int,
    tp: int,
    mode: str,
    replicate: int = 1,
    fsdp_only: list[tuple[int, ...]] = (),
    power_iters: int = 1,
    bytes_per_float: int = 4,
) -> dict[str, float]:
    """σ traffic per optimizer step of one rank under tensor parallelism of degree ``tp`` composed with FSDP2 over
    ``dp`` ranks (HSDP: ``replicate`` × ``dp`` × ``tp``; ``dp = 1``: TP alone), as the DTensor adapter
    (``hf_weyl.integrations.fsdp``) runs it, for the capped tensors of one param group:

    * ``colwise`` (dim-0 TP shards: ColwiseParallel, embeddings' RowwiseParallel) and ``rowwise`` (dim-1 TP shards:
      RowwiseParallel) — TP alone: row pieces and column blocks over the TP group (``vector_reduce``: in the
      same collectives; ``gather``: apart); with FSDP2: 2-D blocks over the dp × tp grid, reduced over the world
      in one collective when there are no replicas, else over the dp group and then the tp group;
    * ``fsdp_only``: tensors FSDP2 shards on dim 0 and TP leaves replicated (norms with ``cap_vectors``): row
      pieces over the dp group (:func:`comm_bytes_per_step`).

    Returns {"payload", "wire", "collectives"} as :func:`comm_bytes_per_step` does."""
    parts = []
    kw = dict(power_iters=power_iters, bytes_per_float=bytes_per_float)
    if dp == 1 and replicate == 1:
        if mode == "vector_reduce":
            parts.append(block_comm_bytes_per_step([*colwise, *rowwise], [tp], mode, **kw))
        else:
            parts.append(comm_bytes_per_step(list(colwise), tp, mode, **kw))
            parts.append(block_comm_bytes_per_step(list(rowwise), [tp], mode, **kw))
    else:
        stages = [dp * tp] if replicate == 1 else [dp, tp]
        parts.append(block_comm_bytes_per_step([*colwise, *rowwise], stages, mode, **kw))
    if fsdp_only and dp > 1:
        parts.append(comm_bytes_per_step(list(fsdp_only), dp, mode, **kw))
    return {k: sum(p[k] for p in parts) for k in ("payload", "wire", "collectives")}


# --------------------------------------------------------------------------------------------
# σ's by layout: what the core step calls
# --------------------------------------------------------------------------------------------


def piece_as_block(piece: RowPiece) -> tuple[Index, Index]:
    """(rows, cols) of a row piece holding whole rows of an m×n matrix, or a run of a 1×n one."""
    m, n = piece.dims
    if not piece.numel:
        return slice(0, 0), slice(0, 0)
    if m == 1:
        return slice(0, 1), slice(piece.start, piece.start + piece.numel)
    return slice(piece.start // n, (piece.start + piece.numel) // n), slice(0, n)


def layout_sigmas(
    layouts: list[RowPiece | Block],
    weights: list[Tensor],
    directions: list[Tensor],
    weight_vectors: list[Tensor],
    update_vectors: list[Tensor],
    iters: PowerIters,
    mode: str,
) -> tuple[Tensor, Tensor]:
    """(σ_W, σ_U) of matrices laid out across ranks (:mod:`hf_weyl.core.layout`), batched per reduction: row pieces
    over one group in one :func:`sharded_sigmas`, blocks over the same groups in one :func:`block_sigmas`; under
    ``vector_reduce`` row pieces join the blocks reduced over their group alone (TP: Colwise and Rowwise shards in
    the same collectives). A collective call; the batches run in first-appearance order, identical on every rank."""
    device = weight_vectors[0].device
    sigma_w = torch.zeros(len(layouts), dtype=torch.float32, device=device)
    sigma_u = torch.zeros_like(sigma_w)
    batches: dict[Any, list[int]] = {}
    for i, lay in enumerate(layouts):
        batches.setdefault(("blocks", lay.groups) if isinstance(lay, Block) else lay.group, []).append(i)
    if mode == "vector_reduce":
        for key in [k for k in batches if isinstance(k, tuple) and len(k[1]) == 1]:
            if key[1][0] in batches:
                batches[key] = sorted(batches[key] + batches.pop(key[1][0]))
    for key, idx in batches.items():
        w, d = [weights[i] for i in idx], [directions[i] for i in idx]
        wv, uv = [weight_vectors[i] for i in idx], [update_vectors[i] for i in idx]
        if isinstance(key, tuple):
            cuts = [(layouts[i].rows, layouts[i].cols) if isinstance(layouts[i], Block) else piece_as_block(layouts[i])
                    for i in idx]
            grid = tuple(zip(*[layouts[i].grid for i in idx])) if mode == "gather" else None
            where = Blocks(tuple(layouts[i].dims for i in idx), tuple(r for r, _ in cuts), tuple(c for _, c in cuts),
                           key[1], grid)
            sw, su = block_sigmas(w, d, where, wv, uv, iters, mode)
        else:
            where = Pieces(tuple(layouts[i].dims for i in idx), tuple(layouts[i].start for i in idx),
                           tuple(layouts[i].numel for i in idx), key)
            sw, su = sharded_sigmas(w, d, where, wv, uv, iters, mode)
        index = torch.tensor(idx, device=device)
        sigma_w.index_copy_(0, index, sw.to(device))
        sigma_u.index_copy_(0, index, su.to(device))
    return sigma_w, sigma_u


class _LayoutSigma:
    """The distributed tier as the core step calls it (:class:`hf_weyl.core.layout.ShardedSigma`)."""

    sigmas = staticmethod(layout_sigmas)
    all_reduce_ = staticmethod(all_reduce_)
    all_reduce_start = staticmethod(all_reduce_start)


#: σ's of matrices laid out across ranks, for :class:`hf_weyl.core.layout.StepPlan`.
LAYOUT_SIGMA = _LayoutSigma()
