"""Core tier (torch only): power iteration, the AdamW² step phases and the ``AdamWeyl`` optimizer."""

from .optimizer import AdamWeyl, CapStats, unwrap_adamweyl
from .tau_rule import tau_for_steps

__all__ = ["AdamWeyl", "CapStats", "tau_for_steps", "unwrap_adamweyl"]
