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

from ..core.power_iteration import PowerIters, Segments, power_iteration_, power_steps_
from .collectives import COMM_STATS, all_gather, all_reduce_

__all__ = ["COMM_STATS", "SIGMA_MODES", "Pieces", "comm_bytes_per_step", "matrix_dims", "sharded_sigmas"]

#: How σ's of split matrices are computed (``sigma_mode`` option of ``AdamWeyl``).
SIGMA_MODES = ("vector_reduce", "gather")




def matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(m, n) of the matrix AdamW² caps for a tensor of this shape: (shape[0], rest), vectors (1, n)."""
    shape = torch.Size(shape)
    if len(shape) >= 2:
        return int(shape[0]), int(shape[1:].numel())
    return 1, int(shape.numel())


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
    if iters.weight == iters.update:  # W and U in the same collectives
        both = Pieces(pieces.dims * 2, pieces.starts * 2, pieces.numels * 2, pieces.group)
        sigma = _sigma_vector_reduce(w_flat + u_flat, both, [*weight_vectors, *update_vectors], iters.weight)
        return sigma[:k], sigma[k:]
    return (_sigma_vector_reduce(w_flat, pieces, weight_vectors, iters.weight),
            _sigma_vector_reduce(u_flat, pieces, update_vectors, iters.update))


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

    sigma, x = power_steps_(
        lambda xs: products(xs, long, tall),  # B x: A x for tall matrices, Aᵀ x for wide ones
        lambda ys: products(ys, short, [not t for t in tall]),  # Bᵀ y
        torch.cat(vectors),
        short,
        long,
        iters,
    )
    torch._foreach_copy_(vectors, list(x.split(short.sizes)))
    return sigma


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
    shapes: list[tuple[int, ...]], world: int, mode: str, *, power_iters: int = 1, bytes_per_float: int = 4
) -> dict[str, float]:
    """Payload bytes one rank hands to the σ collectives per optimizer step for these capped tensors (one
    call of :func:`sharded_sigmas`), and the bytes it sends on the wire with ring algorithms."""
    if mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {mode!r}; valid: {SIGMA_MODES}")
    if not shapes:
        return {"payload": 0, "wire": 0, "collectives": 0}
    if mode == "vector_reduce":
        payload = sum(2 * (m + n) for m, n in map(matrix_dims, shapes)) * power_iters * bytes_per_float
        return {"payload": payload, "wire": 2 * (world - 1) / world * payload, "collectives": 2 * power_iters}
    numel = sum(torch.Size(s).numel() for s in shapes)
    local = 2 * numel / world * bytes_per_float  # W and U pieces (≈ evenly split)
    meta = 16 * len(shapes) * 2
    return {"payload": local + meta, "wire": (world - 1) * (local + meta), "collectives": 2}
