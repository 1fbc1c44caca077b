"""``evaluate`` metric modules shipped with hf_weyl, loaded by path so they work offline.

``load_metric("accuracy")`` is ``evaluate.load(<this folder>/accuracy)``: no Hub download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["METRICS_DIR", "available_metrics", "load_metric"]

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the metric modules shipped here."""
    return sorted(p.parent.name for p in METRICS_DIR.glob("*/*.py") if p.stem == p.parent.name)


def load_metric(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of a shipped metric module by its path."""
    import evaluate

    if name not in available_metrics():
        raise ValueError(f"unknown metric {name!r}; hf_weyl ships {available_metrics()}")
    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"), **kwargs)
