"""``optim="adamw_weyl"`` for ``transformers.Trainer``, registered the way transformers adds its own.

transformers dispatches ``TrainingArguments.optim`` through ``OptimizerNames`` (validated at
argument parsing) and the handler table ``trainer_optimizer._OPTIMIZER_HANDLERS`` (name → function
turning ``TrainingArguments`` + ``optim_args`` into optimizer class + kwargs). We add one enum member
and one handler; no Trainer method is patched. Registration is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.optimizer import AdamWeyl

__all__ = ["OPTIM_ARGS", "OPTIM_NAME", "optimizer_kwargs_from_optim_args", "register_with_transformers"]

OPTIM_NAME = "adamw_weyl"


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of true/false/1/0/yes/no")


def _parse_int(value: str) -> int:
    return int(value.strip())


def _parse_float(value: str) -> float:
    return float(value.strip())


#: Every ``AdamWeyl`` constructor option reachable through ``optim_args`` ("key=value,key=value"),
#: with its parser. ``beta1``/``beta2`` set ``betas`` (a pair cannot be written in optim_args).
OPTIM_ARGS: dict[str, Callable[[str], Any]] = {
    "lr": _parse_float,
    "beta1": _parse_float,
    "beta2": _parse_float,
    "eps": _parse_float,
    "weight_decay": _parse_float,
    "tau": _parse_float,
    "power_iters": _parse_int,
    "cap_vectors": _parse_bool,
    "cold_start_iters": _parse_int,
    "sigma_mode": str.strip,  # DeepSpeed ZeRO: "vector_reduce" or "gather" (checked by AdamWeyl)
}


def optimizer_kwargs_from_optim_args(optim_args: str | dict[str, str] | None) -> dict[str, Any]:
    """Parse ``"tau=0.01,power_iters=2"`` (or transformers' already split dict) to typed AdamWeyl kwargs.

    Unknown keys and malformed values raise ``ValueError`` naming the key and listing the valid ones.
    Ranges are checked by ``AdamWeyl`` itself when it is constructed.
    """
    if not optim_args:
        return {}
    if isinstance(optim_args, str):
        pairs = {}
        for item in optim_args.replace(" ", "").split(","):
            if not item:
                continue
            if item.count("=") != 1:
                raise ValueError(
                    f"optim_args for {OPTIM_NAME}: malformed entry {item!r}; expected key=value pairs separated "
                    f"by commas, with keys from {sorted(OPTIM_ARGS)}"
                )
            key, value = item.split("=")
            pairs[key] = value
        optim_args = pairs
    kwargs: dict[str, Any] = {}
    for key, value in optim_args.items():
        if key not in OPTIM_ARGS:
            raise ValueError(f"optim_args for {OPTIM_NAME}: unknown key {key!r}; valid keys are {sorted(OPTIM_ARGS)}")
        try:
            kwargs[key] = OPTIM_ARGS[key](value)
        except ValueError as err:
            raise ValueError(
                f"optim_args for {OPTIM_NAME}: cannot parse {key}={value!r} ({err}); valid keys are {sorted(OPTIM_ARGS)}"
            ) from None
    return kwargs


def _betas_from(kwargs: dict[str, Any], default: tuple[float, float]) -> tuple[float, float]:
    return (kwargs.pop("beta1", default[0]), kwargs.pop("beta2", default[1]))


def _get_adamw_weyl(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Handler for ``optim="adamw_weyl"``: Trainer's lr/betas/eps (+ per-group weight decay), then optim_args."""
    overrides = optimizer_kwargs_from_optim_args(ctx.optim_args)
    kwargs = {**ctx.optimizer_kwargs, **ctx.adam_kwargs}
    kwargs["betas"] = _betas_from(overrides, kwargs["betas"])
    kwargs.update(overrides)
    ctx.optimizer_kwargs.clear()
    ctx.optimizer_kwargs.update(kwargs)
    return AdamWeyl, ctx.optimizer_kwargs


def _add_enum_member(enum_cls: type, name: str, value: str) -> Any:
    """Add ``name = value`` to a (str, Enum) class, as if it had been declared there. Idempotent."""
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def register_with_transformers() -> bool:
    """Make ``optim="adamw_weyl"`` known to transformers. Returns False if transformers is absent."""
    try:
        from transformers import trainer_optimizer
        from transformers.training_args import OptimizerNames
    except ImportError:
        return False
    member = _add_enum_member(OptimizerNames, OPTIM_NAME.upper(), OPTIM_NAME)
    trainer_optimizer._OPTIMIZER_HANDLERS[member] = _get_adamw_weyl
    return True
