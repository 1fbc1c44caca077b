"""``optim="adamw_weyl"`` for ``transformers.Trainer``, registered the way transformers adds its own.

transformers dispatches ``TrainingArguments.optim`` through ``OptimizerNames`` (validated at
argument parsing) and the handler table ``trainer_optimizer._OPTIMIZER_HANDLERS`` (name → function
turning ``TrainingArguments`` + ``optim_args`` into optimizer class + kwargs). We add one enum member
and one handler, wrap the private ``optim_args`` splitter so that a string it cannot split gets
our message, and add :class:`~hf_weyl.integrations.trainer_callback.WeylTrainerCallback` to the Trainer's
default callbacks (``tau=auto`` from the run's step count, the cap's statistics in the logs; inert for other
optimizers); no Trainer method is patched. Registration is idempotent.

``import hf_weyl`` does not import those transformers modules (``transformers.training_args`` imports
accelerate): it registers when transformers loads them (:func:`register_on_import`).
"""

from __future__ import annotations

import importlib.abc
import logging
import math
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..core.optimizer import AdamWeyl
from ..core.tau_rule import tau_for_steps
from .internals.transformers import add_enum_member, attn_implementation, private

__all__ = [
    "OPTIM_ARGS",
    "OPTIM_NAME",
    "TRAINER_FLAGS",
    "TRAINER_ONLY_ARGS",
    "attn_implementation",
    "optimizer_kwargs_from_optim_args",
    "register_on_import",
    "register_with_transformers",
    "trainer_options_from_optim_args",
]

OPTIM_NAME = "adamw_weyl"

logger = logging.getLogger(__name__)


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
    number = float(value.strip())
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {number}")
    return number


def _parse_tau(value: str) -> float | str:
    """A number, or ``auto``: τ from the run's total optimizer steps by :func:`hf_weyl.tau_for_steps` (our rule)."""
    return "auto" if value.strip() == "auto" else _parse_float(value)


#: The keys of ``optim_args`` ("key=value,key=value"), with their parsers: ``AdamWeyl`` options, and the
#: ``TRAINER_ONLY_ARGS``.
OPTIM_ARGS: dict[str, Callable[[str], Any]] = {
    "tau": _parse_tau,
    "power_iters": _parse_int,
    "cap_vectors": _parse_bool,
    "cold_start_iters": _parse_int,
    "sigma_mode": str.strip,  # DeepSpeed ZeRO: "vector_reduce" or "gather" (checked by AdamWeyl)
    "capturable": _parse_bool,  # counters on the device, no host read in step() (CUDA graphs)
    "log_cap": _parse_bool,  # the cap's statistics in the Trainer's logs (default true)
}

#: ``optim_args`` keys that configure the Trainer integration (WeylTrainerCallback), not ``AdamWeyl``.
TRAINER_ONLY_ARGS = ("log_cap",)

#: The τ an epoch-based ``tau=auto`` run's optimizer is built with until WeylTrainerCallback sets the run's τ
#: at ``on_train_begin``, before the first step (the rule's smallest τ, the paper's GPT value).
TAU_AUTO_PLACEHOLDER = tau_for_steps(10**9)

#: The other constructor options are TrainingArguments fields; in ``optim_args`` they are refused, naming the
#: flag (the Trainer writes ``weight_decay`` into every param group, which would beat ours; DeepSpeed's
#: "auto" scheduler takes ``learning_rate``; one spelling each keeps ``training_args.json`` true).
TRAINER_FLAGS: dict[str, str] = {
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "eps": "adam_epsilon",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
}

_FORMAT = "key=value pairs separated by commas"


def _valid_keys() -> str:
    return f"valid keys are {sorted(OPTIM_ARGS)}"


def _split(optim_args: str) -> dict[str, str]:
    """``"a=1,b=2"`` → ``{"a": "1", "b": "2"}`` (spaces dropped, as transformers does); anything else refused."""
    pairs: dict[str, str] = {}
    for item in optim_args.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(
                f"optim_args for {OPTIM_NAME}: {optim_args!r} has the entry {item!r}, which is not key=value; "
                f"expected {_FORMAT} (no trailing comma); {_valid_keys()}"
            )
        if key in pairs:
            raise ValueError(f"optim_args for {OPTIM_NAME}: {key!r} given twice in {optim_args!r}; give each key once")
        pairs[key] = value
    return pairs


def optimizer_kwargs_from_optim_args(optim_args: str | dict[str, str] | None) -> dict[str, Any]:
    """Parse ``"tau=0.01,power_iters=2"`` (or transformers' already split dict) to typed AdamWeyl kwargs.

    Malformed entries, duplicate and unknown keys, keys that are TrainingArguments flags, values that do
    not parse and non-finite numbers raise ``ValueError`` naming what was seen and listing the valid keys.
    Ranges are checked by ``AdamWeyl`` itself when it is constructed. The ``TRAINER_ONLY_ARGS`` are checked
    and left out (:func:`trainer_options_from_optim_args`).
    """
    return {k: v for k, v in _parse_optim_args(optim_args).items() if k not in TRAINER_ONLY_ARGS}


def trainer_options_from_optim_args(optim_args: str | dict[str, str] | None) -> dict[str, bool]:
    """What ``optim_args`` asks of the Trainer integration: ``{"log_cap": ..., "tau_auto": ...}``."""
    parsed = _parse_optim_args(optim_args)
    return {"log_cap": parsed.get("log_cap", True), "tau_auto": parsed.get("tau") == "auto"}


def _parse_optim_args(optim_args: str | dict[str, str] | None) -> dict[str, Any]:
    """Every ``optim_args`` key, typed and checked (see :func:`optimizer_kwargs_from_optim_args`)."""
    if not optim_args:
        return {}
    pairs = _split(optim_args) if isinstance(optim_args, str) else dict(optim_args)
    kwargs: dict[str, Any] = {}
    for key, value in pairs.items():
        if key in TRAINER_FLAGS:
            flag = TRAINER_FLAGS[key]
            raise ValueError(
                f"optim_args for {OPTIM_NAME}: {key}={value} is a TrainingArguments option; set it with "
                f"--{flag} (TrainingArguments({flag}=...)) instead; optim_args {_valid_keys()}"
            )
        if key not in OPTIM_ARGS:
            raise ValueError(f"optim_args for {OPTIM_NAME}: unknown key {key!r}; {_valid_keys()}")
        try:
            kwargs[key] = OPTIM_ARGS[key](value)
        except ValueError as err:
            raise ValueError(f"optim_args for {OPTIM_NAME}: cannot parse {key}={value!r} ({err}); {_valid_keys()}") from None
    return kwargs


def _get_adamw_weyl(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Handler for ``optim="adamw_weyl"``: the Trainer's lr/betas/eps (+ per-group weight decay), then optim_args.

    Parses the raw ``args.optim_args`` string (transformers' split dict has already dropped duplicates).
    ``tau=auto``: τ from ``--max_steps`` when given; in an epoch-based run the total is the Trainer's, known
    when training starts: ``TAU_AUTO_PLACEHOLDER`` until WeylTrainerCallback sets it, before the first step.
    """
    raw = getattr(ctx.args, "optim_args", None)
    overrides = optimizer_kwargs_from_optim_args(raw if isinstance(raw, str) else ctx.optim_args)
    if overrides.get("tau") == "auto":
        steps = getattr(ctx.args, "max_steps", -1)
        overrides["tau"] = tau_for_steps(steps) if isinstance(steps, int) and steps >= 1 else TAU_AUTO_PLACEHOLDER
    _keep_adamweyl_under_offload()
    kwargs = {**ctx.optimizer_kwargs, **ctx.adam_kwargs, **overrides}
    ctx.optimizer_kwargs.clear()
    ctx.optimizer_kwargs.update(kwargs)
    return AdamWeyl, ctx.optimizer_kwargs


def _keep_adamweyl_under_offload() -> None:
    """Under DeepSpeed CPU optimizer offload, the DeepSpeed config the Trainer announced gets
    ``zero_force_ds_cpu_optimizer: false`` (one log line), so that accelerate keeps the AdamWeyl built here
    instead of replacing it by DeepSpeedCPUAdam. Imports nothing that is not already loaded."""
    if "transformers.integrations.deepspeed" not in sys.modules:
        return
    from .deepspeed import KEEP_CLIENT_OPTIMIZER, active_deepspeed_configs, keep_client_optimizer_under_offload

    for config in active_deepspeed_configs():
        if keep_client_optimizer_under_offload(config):
            logger.warning(
                f"hf_weyl: optim={OPTIM_NAME!r} under DeepSpeed optimizer offload: set {KEEP_CLIENT_OPTIMIZER} in the "
                "DeepSpeed config, so that AdamWeyl (not DeepSpeedCPUAdam) steps the offloaded partitions"
            )


def _refuse_dropped_optimizer(deepspeed_init: Callable[..., Any]) -> Callable[..., Any]:
    """``transformers.trainer.deepspeed_init``, refusing an ``AdamWeyl`` passed as ``Trainer(optimizers=...)``: transformers
    sets ``trainer.optimizer = None`` there and builds ``args.optim`` instead, which would train without the cap."""
    if getattr(deepspeed_init, "_hf_weyl_wrapped", False):
        return deepspeed_init

    def guarded(trainer: Any, num_training_steps: int, inference: bool = False, **kwargs: Any) -> Any:
        passed = getattr(trainer, "optimizer", None)
        if not inference and isinstance(passed, AdamWeyl):
            raise ValueError(
                f"Trainer(optimizers=(AdamWeyl(...), ...)) with a DeepSpeed config: transformers drops a passed optimizer "
                f"under DeepSpeed and builds TrainingArguments.optim={str(getattr(trainer.args, 'optim', '?'))!r} instead, "
                f"which would not be the AdamWeyl you built. Pass TrainingArguments(optim={OPTIM_NAME!r}, optim_args="
                "\"tau=...\") and no optimizers=, or use accelerate / deepspeed.initialize directly."
            )
        return deepspeed_init(trainer, num_training_steps, inference=inference, **kwargs)

    guarded._hf_weyl_wrapped = True  # type: ignore[attr-defined]
    guarded.__wrapped__ = deepspeed_init  # type: ignore[attr-defined]
    return guarded


def _register_name(training_args: ModuleType) -> None:
    add_enum_member(training_args.OptimizerNames, OPTIM_NAME.upper(), OPTIM_NAME)


def _register_handler(trainer_optimizer: ModuleType) -> None:
    handlers = private(trainer_optimizer, "_OPTIMIZER_HANDLERS", dict)
    handlers[trainer_optimizer.OptimizerNames(OPTIM_NAME)] = _get_adamw_weyl


def _wrap_optim_args_splitter(trainer: ModuleType) -> None:
    split = private(trainer, "_parse_optim_args", Callable)
    if getattr(split, "_hf_weyl_wrapped", False):
        return

    def _parse_optim_args(optim_args_str: str | None) -> dict[str, str]:
        try:
            return split(optim_args_str)
        except ValueError:  # "not enough values to unpack" and the like: say what is wrong and what is valid
            raise ValueError(
                f"optim_args {optim_args_str!r} cannot be split by transformers into {_FORMAT} (no trailing comma, "
                f"one '=' per entry); for optim={OPTIM_NAME!r} the {_valid_keys()}"
            ) from None

    _parse_optim_args._hf_weyl_wrapped = True  # type: ignore[attr-defined]
    _parse_optim_args.__wrapped__ = split  # type: ignore[attr-defined]
    trainer._parse_optim_args = _parse_optim_args


def _add_default_callback(trainer: ModuleType) -> None:
    """WeylTrainerCallback among the Trainer's default callbacks: its ``on_log`` runs before the reporters'."""
    callbacks = private(trainer, "DEFAULT_CALLBACKS", list)
    from .trainer_callback import WeylTrainerCallback

    if WeylTrainerCallback not in callbacks:
        callbacks.append(WeylTrainerCallback)


def _wrap_deepspeed_init(trainer: ModuleType) -> None:
    trainer.deepspeed_init = _refuse_dropped_optimizer(private(trainer, "deepspeed_init", Callable))


def _on_trainer_load(trainer: ModuleType) -> None:
    _wrap_optim_args_splitter(trainer)
    _wrap_deepspeed_init(trainer)
    _add_default_callback(trainer)


#: transformers module → what to do once it has loaded (in import order: the enum module comes first).
_ON_LOAD: dict[str, Callable[[ModuleType], None]] = {
    "transformers.training_args": _register_name,
    "transformers.trainer_optimizer": _register_handler,
    "transformers.trainer": _on_trainer_load,
}


def register_with_transformers() -> bool:
    """Make ``optim="adamw_weyl"`` known to transformers now (imports its Trainer modules, and so accelerate).

    Returns False if transformers is absent; raises RuntimeError if its internals changed.
    """
    try:
        import transformers.trainer  # noqa: F401  (imports training_args and trainer_optimizer too)
    except ImportError:
        return False
    for name, action in _ON_LOAD.items():
        action(sys.modules[name])
    return True


class _ThenRun(importlib.abc.Loader):
    """A module's own loader, followed by ``action(module)`` once the module has executed."""

    def __init__(self, loader: Any, action: Callable[[ModuleType], None]):
        self._loader, self._action = loader, action

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run_warning(self._action, module)  # raising here would break `import transformers...` for everyone

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, resource readers, ...
        return getattr(self._loader, name)


class _RegisterOnLoad(importlib.abc.MetaPathFinder):
    """Finds the transformers modules of ``_ON_LOAD`` with the other finders and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        action = _ON_LOAD.get(fullname)
        if action is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRun(spec.loader, action)
                return spec
        return None


def register_on_import() -> None:
    """What ``import hf_weyl`` does: register with the transformers modules already loaded, and with the
    others when transformers loads them — so ``TrainingArguments(optim="adamw_weyl")``, ``--optim adamw_weyl``
    and unpickling ``training_args.bin`` work afterwards, without importing accelerate now."""
    if not any(isinstance(f, _RegisterOnLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnLoad())
    for name, action in _ON_LOAD.items():
        module = sys.modules.get(name)
        if module is not None:
            _run_warning(action, module)


def _run_warning(action: Callable[[ModuleType], None], module: ModuleType) -> None:
    """Run ``action``; on failure warn (fail closed: the name stays unknown) instead of breaking an import."""
    try:
        action(module)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"hf_weyl: optim={OPTIM_NAME!r} not registered: {err}", RuntimeWarning, stacklevel=3)
