"""torch.distributed internals hf_weyl reads (the only place): FSDP1's markers and DTensor's strided shard.

* ``torch.distributed.fsdp._common_utils.FSDP_FLATTENED`` (the attribute FSDP1 sets on flat and flattened-original
  parameters) and ``torch.distributed.fsdp._flat_param.FlatParameter``: if a torch upgrade removes them while FSDP
  is in use, every step is refused (fail closed) rather than the FSDP1 refusal silently switched off.
* ``torch.distributed.tensor.placement_types._StridedShard`` (``fully_shard`` of a tensor-parallel parameter) and its
  ``split_factor``: if they are gone, a strided placement is refused (it is then an unknown placement), never
  mapped as a plain shard.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from . import read

__all__ = ["TESTED_TORCH", "fsdp1_markers", "split_factor", "strided_shard"]

TESTED_TORCH = "2.13"


def fsdp1_markers() -> tuple[str, type] | None:
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
            f"torch {TESTED_TORCH}. Refusing to step rather than risk training FSDP1 shards as plain AdamW; install a "
            "tested torch version or report this."
        ) from None
    return FSDP_FLATTENED, FlatParameter


def strided_shard() -> type | None:
    """DTensor's strided shard placement class (FSDP2 over tensor parallelism), None where torch has none."""
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        return None
    return _StridedShard


def split_factor(placement: Any) -> int:
    """The ``split_factor`` of a strided shard (≥ 1); fails closed naming the torch version."""
    factor = read("torch", TESTED_TORCH, placement, "split_factor", "how a strided shard cuts its dim", int)
    if factor < 1:
        raise RuntimeError(f"torch {torch.__version__}: a strided shard {placement!r} has split_factor {factor} < 1")
    return factor
