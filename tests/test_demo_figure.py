"""The demo's figure and summary (recipes/compare_runs.py → hf_weyl.recipe.plotting.plot_story) read without the
README: every panel has a title, axis labels and a legend saying which run is which and what each line style is; the
summary says in numbers what the entropy and σ1 panels show — collapse delayed is not collapse prevented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from test_recipes import load_recipe

STEPS = range(0, 301, 10)


def write_run(folder: Path, optimizer: str, warmup: int, entropy, sigma, capped: bool) -> Path:
    """A finished recipe run folder (``train_log.json`` + ``all_results.json``) with the demo's keys."""
    log = []
    for step in STEPS:
        step = max(step, 1)
        record = {"step": step, "train_loss": 7.0 - step / 100, "lr": 0.1, "monitor/entropy_min": entropy(step),
                  "monitor/sigma_qk_max": sigma(step)}
        if step % 50 == 0:
            record["eval_loss"] = 7.0 - step / 120
        if capped:
            record.update({"cap/capped_fraction": 0.5, "cap/lr_ratio_mean": 0.2, "cap/lr_ratio_median": 0.1,
                           "cap/lr_ratio_min": 0.01})
        log.append(record)
    folder.mkdir(parents=True)
    (folder / "train_log.json").write_text(json.dumps(log))
    results = {"eval_loss": log[-1]["eval_loss"], "optimizer": optimizer, "warmup_steps": warmup, "step": 300,
               "tau": 0.03 if capped else None}
    (folder / "all_results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """The demo's three runs (AdamW²'s entropy falls to 0.02 by step 250, AdamW's to 0 by step 20), compared; returns
    (figure, summary.md text, summary)."""
    runs = [
        write_run(tmp_path / "adamw_weyl", "adamw_weyl", 0, lambda s: 0.02 if s >= 250 else 3.0 - s / 100, lambda s: 6.0, True),
        write_run(tmp_path / "adamw", "adamw", 0, lambda s: 0.0 if s >= 20 else 2.0, lambda s: 540.0, False),
        write_run(tmp_path / "adamw_warmup", "adamw", 30, lambda s: 0.0 if s >= 30 else 3.0, lambda s: 600.0, False),
    ]
    figures = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    out = tmp_path / "out"
    summary = load_recipe("compare_runs").main([*map(str, runs), "--output_dir", str(out)])
    assert len(figures) == 1
    return figures[0], (out / "summary.md").read_text(), summary


def _legend(ax) -> list[str]:
    """The texts of the panel's legend (on the panel, or on a twin axis over it)."""
    twins = [a for a in ax.figure.axes if a.get_position().bounds == ax.get_position().bounds]
    legends = [a.get_legend() for a in twins if a.get_legend() is not None]
    assert len(legends) == 1, f"panel {ax.get_title()!r} has {len(legends)} legends"
    return [t.get_text() for t in legends[0].get_texts()]


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_title()]  # (a twin axis has no title)


def test_every_panel_has_a_title_axis_labels_and_a_legend_of_the_runs(demo):
    fig, _, summary = demo
    axes = _panels(fig)
    assert len(axes) == 4
    for ax in axes:
        assert ax.get_title() and ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
        texts = _legend(ax)
        for run in summary:
            assert any(t.startswith(run) for t in texts) or any("no cap" in t and run in t for t in texts), (ax.get_title(), run)
    assert "nats" in axes[0].get_ylabel() and "nats" in axes[1].get_ylabel()


def test_line_styles_are_in_the_legends(demo):
    fig, _, _ = demo
    loss, _, _, cap = _panels(fig)
    texts = _legend(loss)
    assert any("validation loss" in t for t in texts) and any("faint" in t and "training loss" in t for t in texts)
    texts = _legend(cap)
    weyl = "AdamW² τ=0.03, no warmup"
    assert f"{weyl}: median over capped tensors" in texts and f"{weyl}: smallest tensor" in texts
    styles = {line.get_label(): line.get_linestyle() for line in cap.get_lines()}
    assert styles[f"{weyl}: median over capped tensors"] == "-" and styles[f"{weyl}: smallest tensor"] == "--"
    assert any("no cap" in t and "AdamW, no warmup" in t for t in texts)
    assert f"scheduled lr of {weyl} (right axis)" in texts


def test_summary_says_collapse_was_delayed_not_prevented(demo):
    _, text, summary = demo
    weyl = "AdamW² τ=0.03, no warmup"
    assert summary[weyl]["entropy_near_collapse_step"] == 250 and summary["AdamW, no warmup"]["entropy_near_collapse_step"] == 20
    assert f"{weyl}: minimum attention entropy first below 0.1 nats at step 250; its lowest, 0.020 nats, by step 250." in text
    assert "AdamW, no warmup: minimum attention entropy first below 0.1 nats at step 20; its lowest, 0.000 nats" in text
    assert f"{weyl} delayed it but did not prevent it" in text
    assert f"Largest σ1(W_qᵀW_k) over the run: {weyl} 6; AdamW, no warmup 540 (90×), AdamW, 30 warmup steps 600 (100×)." in text
    assert "prevents" not in text
