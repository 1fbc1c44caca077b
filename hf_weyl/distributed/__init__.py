"""Distributed-σ tier (torch.distributed): σ1 of matrices split into contiguous pieces across ranks."""

from .sigma import COMM_STATS, SIGMA_MODES, Pieces, comm_bytes_per_step, sharded_sigmas

__all__ = ["COMM_STATS", "SIGMA_MODES", "Pieces", "comm_bytes_per_step", "sharded_sigmas"]
