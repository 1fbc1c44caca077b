"""Core tier (torch only): power iteration, the AdamW² step phases and the ``AdamWeyl`` optimizer."""

from .optimizer import AdamWeyl, CapStats, unwrap_adamweyl

__all__ = ["AdamWeyl", "CapStats", "unwrap_adamweyl"]
