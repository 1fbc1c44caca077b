"""accelerate internals hf_weyl reads (the only place): the DeepSpeed plugins an ``Accelerator`` announced."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import read

__all__ = ["TESTED_ACCELERATE", "deepspeed_plugins"]

TESTED_ACCELERATE = "1.x"


def deepspeed_plugins(accelerate_state: ModuleType) -> list[Any]:
    """The DeepSpeed plugins in accelerate's shared state (``AcceleratorState._shared_state["deepspeed_plugins"]``,
    set before any optimizer is prepared), as a list; fails closed if accelerate no longer keeps that state."""
    shared = read("accelerate", TESTED_ACCELERATE, accelerate_state.AcceleratorState, "_shared_state",
                  "the state every Accelerator shares, where its DeepSpeed plugins are", dict)
    plugins = shared.get("deepspeed_plugins")
    if not plugins:
        return []
    return list(plugins.values()) if isinstance(plugins, dict) else [plugins]
