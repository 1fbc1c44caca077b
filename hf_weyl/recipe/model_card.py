"""Model cards of recipe runs, rendered from ``model_cards/*.md`` with ``huggingface_hub.ModelCard``.

The card's YAML header carries ``model-index`` (the evaluation results), tags (``adamw_weyl``,
``no-warmup``), datasets and base model; the body the hyperparameters actually used (optimizer, τ,
warmup steps; an option changed on resume shows each value with its steps), the embedded training
plots and the exact reproduce commands.

A run whose metrics are not finite (NaN or ±inf: it diverged) gets no evaluation results: no ``model-index``
entries, a ``diverged`` tag, and a card that says so in its first line and in the results table
(:func:`diverged_reason`); ``hf_weyl.recipe.hub.push_run`` refuses to upload it.

The template is read as a package resource (``importlib.resources``): it ships inside the package, so a
wheel install renders cards with no source tree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["TEMPLATE", "CardMetric", "default_template", "diverged_reason", "render_model_card",
           "training_hyperparameters"]

#: The default template: ``model_cards/adamw_weyl_recipe.md`` inside the ``hf_weyl.recipe`` package.
TEMPLATE = ("hf_weyl.recipe", "model_cards/adamw_weyl_recipe.md")
#: Card rows of the options that may change on resume.
_ROW_OF_OPTION = {"learning_rate": "learning rate (peak)", "tau": "tau (τ)"}


def default_template() -> str:
    """The default template's text, read from the installed package."""
    package, name = TEMPLATE
    ref = resources.files(package).joinpath(name)
    if not ref.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found in the installed {package} package "
                                f"(looked at {ref}); the templates ship inside the package: reinstall hf_weyl")
    return ref.read_text(encoding="utf-8")


@dataclass
class CardMetric:
    """One evaluation result: ``type`` is the Hub metric id (``accuracy``, ``perplexity``, ``loss``)."""

    type: str
    name: str
    value: float
    split: str = "validation"

    @property
    def finite(self) -> bool:
        """A result: a finite number (not NaN, ±inf or missing)."""
        return isinstance(self.value, (int, float)) and not isinstance(self.value, bool) and math.isfinite(self.value)


def diverged_reason(metrics: Iterable[CardMetric]) -> str | None:
    """``"diverged: validation loss is nan"`` when a metric is not a finite number; ``None`` when all are."""
    bad = [m for m in metrics if not m.finite]
    if not bad:
        return None
    return "diverged: " + ", ".join(f"{m.name} is {m.value}" for m in bad)


def training_hyperparameters(args: Any, num_processes: int, tokens_per_example: int | None = None,
                             changes: Iterable[tuple[int, str, Any, Any]] = ()) -> dict[str, Any]:
    """The hyperparameter table of a recipe run (effective batch included). ``changes`` (``TrainLog.changes()``:
    first step, option, old, new) turn an option's row into its values with their steps. A ``--tau auto`` run
    (``args.tau_auto_steps`` set by ``Run.resolve_tau``) shows the τ chosen and the step count it came from."""
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes
    hp: dict[str, Any] = {"optimizer": args.optimizer}
    if args.optimizer == "adamw_weyl":
        auto_steps = getattr(args, "tau_auto_steps", None)
        hp["tau (τ)"] = args.tau if auto_steps is None else f"{args.tau:.4g} (--tau auto, for {auto_steps} optimizer steps)"
        hp["power iterations per step"] = args.power_iters
    hp.update({
        "learning rate (peak)": args.learning_rate,
        "warmup steps": args.warmup_steps if args.warmup_steps else "0 (no warmup)",
        "lr schedule": args.lr_scheduler_type,
        "betas": f"({args.beta1}, {args.beta2})",
        "epsilon": args.adam_epsilon,
        "weight decay": args.weight_decay,
        "gradient clipping": args.max_grad_norm if args.max_grad_norm > 0 else "none",
        "optimizer steps": args.max_train_steps,
        "per-device batch size": args.per_device_train_batch_size,
        "gradient accumulation steps": args.gradient_accumulation_steps,
        "processes": num_processes,
        "effective batch size": batch,
        "seed": args.seed,
    })
    if tokens_per_example:
        hp["tokens per optimizer step"] = batch * tokens_per_example
    by_option: dict[str, list[tuple[int, Any, Any]]] = {}
    for step, option, old, new in changes:
        by_option.setdefault(option, []).append((step, old, new))
    for option, steps in by_option.items():
        row = _ROW_OF_OPTION.get(option, option)
        if row not in hp:
            continue
        parts, first = [], 1
        for step, old, _ in steps:
            parts.append(f"{old} (steps {first}–{step - 1})")
            first = step
        parts.append(f"{steps[-1][2]} (steps {first}–{args.max_train_steps})")
        hp[row] = ", ".join(parts)
    return hp


def _shown(metric: CardMetric, diverged: str | None) -> str:
    """A metric's value in the results table: a number only when it is a result."""
    if not metric.finite:
        return f"{metric.value} (diverged: not a result)"
    return f"{metric.value:.4f}" if diverged is None else f"{metric.value:.4f} (of a diverged run: not a result)"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("hf_weyl", "transformers", "accelerate", "torch", "datasets", "huggingface_hub"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def render_model_card(
    *,
    model_name: str,
    summary: str,
    task_type: str,
    task_name: str,
    dataset_id: str,
    dataset_name: str,
    metrics: list[CardMetric],
    hyperparameters: Mapping[str, Any],
    plots: Mapping[str, str | Path],
    reproduce_command: str | list[str],
    optimizer: str,
    warmup_steps: int,
    tags: list[str] | None = None,
    base_model: str | None = None,
    pipeline_tag: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """Render the card; its metadata validates as ``model-index`` (see ``ModelCard.load(...).data.eval_results``).

    ``reproduce_command``: one command, or the first launch's followed by the resumes that changed an option."""
    for key in ("loss", "cap"):
        if key not in plots:
            raise ValueError(f"plots must include {key!r}, got {sorted(plots)}")
    diverged = diverged_reason(metrics)
    # a diverged run has no results: its finite metrics too come from a model that is NaN or inf somewhere
    eval_results = [] if diverged else [
        EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset_id, dataset_name=dataset_name,
                   dataset_split=m.split, metric_type=m.type, metric_name=m.name, metric_value=m.value)
        for m in metrics
    ]
    all_tags = ["hf_weyl", optimizer, "no-warmup" if warmup_steps == 0 else "warmup", *(tags or [])]
    if diverged:
        all_tags.append("diverged")
        summary = (f"**Training {diverged}.** These weights are kept for inspection, not for use: the evaluation "
                   f"values below are not results, and the metadata reports none.\n\n{summary}")
    card_data = ModelCardData(
        model_name=model_name, eval_results=eval_results or None, tags=all_tags, datasets=[dataset_id],
        license="apache-2.0", library_name="transformers", base_model=base_model, pipeline_tag=pipeline_tag,
        metrics=sorted({m.type for m in metrics}) if not diverged else None,
    )
    commands = [reproduce_command] if isinstance(reproduce_command, str) else list(reproduce_command)
    template = Path(template_path).read_text(encoding="utf-8") if template_path is not None else default_template()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        summary=summary,
        metrics=[{"name": m.name, "split": m.split, "value": _shown(m, diverged)} for m in metrics],
        hyperparameters=dict(hyperparameters),
        plots={k: Path(v).as_posix() for k, v in plots.items()},
        reproduce_commands=commands,
        is_weyl=optimizer == "adamw_weyl",
        optimizer_label="AdamW² (`optim=adamw_weyl`)" if optimizer == "adamw_weyl" else f"`{optimizer}`",
        warmup_label="**no learning-rate warmup**" if warmup_steps == 0 else f"{warmup_steps} warmup steps",
        warmup_steps=warmup_steps,
        versions=_versions(),
    )
