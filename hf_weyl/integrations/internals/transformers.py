"""transformers internals hf_weyl reads (the only place), each through :func:`private` (fails closed naming the
transformers version if a release renames them):

* ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``: optim name → handler (hf_weyl adds ``adamw_weyl``'s);
* ``transformers.trainer._parse_optim_args``: splits ``optim_args`` before any handler runs (wrapped: only its
  error message changes);
* ``transformers.trainer.deepspeed_init``: the Trainer's DeepSpeed set-up (wrapped: refuses an ``AdamWeyl`` passed
  as ``optimizers=``, which it would drop);
* ``transformers.trainer.DEFAULT_CALLBACKS``: the callbacks every Trainer starts with, before the reporting ones
  (hf_weyl adds ``WeylTrainerCallback``);
* ``PreTrainedConfig._attn_implementation``: the monitor's probe pass switches to eager attention
  (:func:`attn_implementation`);
* the public ``OptimizerNames`` enum, extended through the enum module's own tables (:func:`add_enum_member`).
"""

from __future__ import annotations

from typing import Any

from . import read

__all__ = ["TESTED_TRANSFORMERS", "add_enum_member", "attn_implementation", "private"]

TESTED_TRANSFORMERS = "5.23"


def private(obj: Any, name: str, kind: Any) -> Any:
    """``obj.<name>`` of a transformers module or object, of the expected ``kind``; fails closed."""
    return read("transformers", TESTED_TRANSFORMERS, obj, name,
                f"a {kind.__name__ if isinstance(kind, type) else kind} optim='adamw_weyl' needs", kind)


def attn_implementation(model: Any) -> str | None:
    """The attention implementation a transformers model runs (``config._attn_implementation``), None for a
    model that is not a transformers ``PreTrainedModel`` (no ``config`` / ``set_attn_implementation``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return None
    return read("transformers", TESTED_TRANSFORMERS, config, "_attn_implementation", "the attention implementation")


def add_enum_member(enum_cls: type, name: str, value: str) -> Any:
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
