"""hf_weyl: AdamW² ("Taming Transformer Without Using Learning Rate Warmup", ICLR 2025) for the HF stack.

``import hf_weyl`` registers ``optim="adamw_weyl"`` with ``transformers.Trainer`` (when transformers loads its
Trainer modules, so that importing hf_weyl imports torch only). Unmodified scripts: ``python -m hf_weyl SCRIPT``.
"""

from . import integrations  # noqa: F401  (registers the engine adapters: DeepSpeed ZeRO, FSDP2)
from .core.optimizer import AdamWeyl, CapStats, unwrap_adamweyl
from .core.tau_rule import tau_for_steps
from .integrations.trainer import (
    OPTIM_NAME,
    optimizer_kwargs_from_optim_args,
    register_on_import,
    register_with_transformers,
)

__version__ = "0.1.0"

__all__ = [
    "OPTIM_NAME",
    "AdamWeyl",
    "CapStats",
    "__version__",
    "optimizer_kwargs_from_optim_args",
    "register_with_transformers",
    "tau_for_steps",
    "unwrap_adamweyl",
]

register_on_import()
