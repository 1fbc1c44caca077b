"""DeepSpeed internals hf_weyl reads (the only place): the ZeRO fragment bookkeeping of each parameter."""

from __future__ import annotations

from typing import Any

import torch

from . import library_version, read

__all__ = [
    "DEEPSPEED_PRIVATE",
    "TESTED_DEEPSPEED",
    "deepspeed_version",
    "first_set",
    "optional",
    "private",
    "skips_nonfinite_steps",
    "tested_version",
]

#: DeepSpeed versions the ZeRO path is tested with: [low, high). Also declared in pyproject's
#: ``deepspeed`` extra. Others get a warning; the first-step verification of the mapping is the guard.
TESTED_DEEPSPEED = ((0, 19), (0, 20))

#: Every private attribute of DeepSpeed objects hf_weyl reads, with what it is for.
DEEPSPEED_PRIVATE = {
    "param._hp_mapping": "ZeRO-1/2, BF16 optimizer: the fp32 fragment of a parameter (.hp_fragment, "
    ".hp_fragment_address.start, .lp_fragment_address.start/.numel); None where this rank holds none",
    "param._dp_group": "ZeRO-1/2: the data-parallel group the fragments are spread over",
    "param._zero_optimizer": "ZeRO-1/2: the ZeRO optimizer (.round_robin_gradients)",
    "param.ds_id / ds_numel / ds_shape / ds_tensor / ds_process_group / partition_numel()": "ZeRO-3 partitions",
    "param._z3_optimizer": "ZeRO-3: the stage-3 optimizer (.swap_optimizer: NVMe offload)",
    "flat.ds_id": "ZeRO-3: 'first_last' ds_id of the parameters of a flat sub-group",
    "zero_optimizer.compute_grad_norm / .dtype / .check_grad_overflow": "ZeRO-1/2: whether its step() skips a step "
    "whose global gradient norm is not finite before calling the client optimizer (skips_nonfinite_steps)",
}


def _tested() -> str:
    low, high = TESTED_DEEPSPEED
    return f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"


def deepspeed_version() -> str:
    return library_version("deepspeed")


def private(obj: Any, name: str, what: str) -> Any:
    """``obj.<name>`` of a DeepSpeed object (:data:`DEEPSPEED_PRIVATE`); fails closed naming the DeepSpeed version."""
    return read("deepspeed", _tested(), obj, name, what)


def first_set(objs: list[Any], name: str, what: str) -> Any:
    """The first ``obj.<name>`` that is set (not None) among ``objs``; fails closed if none has the attribute at all,
    None if some have it but none is set."""
    values = [getattr(o, name, None) for o in objs]
    found = next((v for v in values if v is not None), None)
    if found is None and not any(hasattr(o, name) for o in objs):
        private(objs[0], name, what)  # raises: the attribute is gone
    return found


def optional(objs: list[Any], name: str) -> Any:
    """The first ``obj.<name>`` that is set among ``objs``, None if none is: for an attribute DeepSpeed sets on some
    routes only (``_zero_optimizer``: ZeRO-1/2 set it, the BF16 optimizer does not)."""
    return next((v for v in (getattr(o, name, None) for o in objs) if v is not None), None)


def tested_version() -> bool:
    """Whether the installed DeepSpeed is one of :data:`TESTED_DEEPSPEED`."""
    import deepspeed

    try:
        parts = tuple(int(x) for x in deepspeed.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    low, high = TESTED_DEEPSPEED
    return low <= parts < high


def skips_nonfinite_steps(params: list[Any], stage: int) -> bool:
    """Whether DeepSpeed's ZeRO optimizer over ``params`` skips every step whose global gradient norm is not finite
    before it calls the client optimizer, so that a non-finite gradient never reaches it. What DeepSpeed 0.19's
    ``step()`` does: ZeRO-3 always (``is_invalid_grad_norm`` of the combined norm); ZeRO-1/2 where it computes the
    norm (``compute_grad_norm``, required under offload) and checks it (any dtype but bf16, or bf16 with
    ``check_grad_overflow``, the default). False — the caller checks itself — for other DeepSpeed versions, the BF16
    optimizer, or where an attribute is not there (never an error: the answer only saves a read of the gradient)."""
    if not tested_version():
        return False
    if stage == 3:
        return optional(params, "_z3_optimizer") is not None
    zero_opt = optional(params, "_zero_optimizer")
    if zero_opt is None:
        return False
    norm, dtype, checks = (getattr(zero_opt, name, None) for name in ("compute_grad_norm", "dtype", "check_grad_overflow"))
    return norm is True and dtype is not None and (dtype != torch.bfloat16 or checks is True)
