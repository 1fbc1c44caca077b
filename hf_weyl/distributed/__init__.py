"""Distributed-σ tier (torch.distributed): σ1 of matrices split into contiguous pieces or 2-D blocks across ranks."""

from . import sigma
from .sigma import *  # noqa: F403  (its __all__: the layouts, the σ functions, the traffic formulas, COMM_STATS)

__all__ = list(sigma.__all__)
