"""The training-dynamics monitor: what the AdamW² paper watched, as a tool.

``collect_metrics`` (any loop), ``WeylMonitorCallback`` (``transformers.Trainer``), ``CollapseDetector``
(early warning of malignant entropy collapse), ``ModelLayout`` (where a model keeps W_q, W_k, ...)
and the plotting helpers in ``hf_weyl.monitor.plots``.
"""

from .callback import DEFAULT_INTERVAL, DEFAULT_PROBE_SIZE, WeylMonitorCallback, probe_batch_from_dataset
from .collect import DEFAULT_SEC_RANKS, collect_metrics, optimizer_metrics, probe_metrics, weight_metrics
from .layouts import BlockWeights, ModelLayout, UnsupportedModelError, resolve_layout
from .spectral import attention_entropy, qk_singular_values, sec_index, sigma_max
from .warning import CollapseAlert, CollapseDetector, CollapseWarning

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_PROBE_SIZE",
    "DEFAULT_SEC_RANKS",
    "BlockWeights",
    "CollapseAlert",
    "CollapseDetector",
    "CollapseWarning",
    "ModelLayout",
    "UnsupportedModelError",
    "WeylMonitorCallback",
    "attention_entropy",
    "collect_metrics",
    "optimizer_metrics",
    "probe_batch_from_dataset",
    "probe_metrics",
    "qk_singular_values",
    "resolve_layout",
    "sec_index",
    "sigma_max",
    "weight_metrics",
]
