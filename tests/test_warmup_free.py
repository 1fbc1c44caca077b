"""CI-sized runs of benchmarks/warmup_free.py: few methods, one rate, a few steps (so the script cannot rot)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "warmup_free.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("warmup_free", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


def test_two_methods_two_taus_one_rate_few_steps(bench, tmp_path):
    out = tmp_path / "table.md"
    raw, small = tmp_path / "seed0.json", tmp_path / "seed0_small.json"
    results = bench.main(["--tasks", "gpt2", "--methods", "adamw_warmup", "adamweyl", "--lrs", "1e-3", "--taus", "0.01", "0.1",
                          "--seeds", "0", "--steps", "4", "--monitor_interval", "2", "--output", str(out),
                          "--img_dir", str(tmp_path), "--json", str(raw), "--summary_json", str(small)])
    assert [(r.method, r.tau) for r in results] == [("adamw_warmup", None), ("adamweyl", 0.01), ("adamweyl", 0.1)]
    for r in results:
        assert r.steps == r.total_steps == 4 and math.isfinite(r.final_val_loss) and r.final_val_loss < 8.5
        assert 0 < r.min_entropy and r.max_sigma_qk > 0 and [h["step"] for h in r.history] == [1, 2, 4]
    assert results[1].final_val_loss != results[2].final_val_loss  # τ reaches the optimizer
    table = out.read_text()
    assert "| gpt2 | 4 | adamweyl | 0.01 | 0.001 |" in table and "| gpt2 | 4 | adamweyl | 0.1 | 0.001 |" in table
    assert "| gpt2 | 4 | adamw_warmup | – | 0.001 |" in table
    assert (tmp_path / "warmup_free_gpt2.png").stat().st_size > 5000
    assert all(row["history"] == [] for row in json.loads(small.read_text()))

    # --from_json merges earlier runs (e.g. one file per seed) without training; a run twice is an error
    merged_md = tmp_path / "merged.md"
    merged = bench.main(["--from_json", str(small), "--output", str(merged_md)])
    assert [(r.method, r.tau, r.final_val_loss) for r in merged] == [(r.method, r.tau, r.final_val_loss) for r in results]
    assert merged_md.read_text() == table
    with pytest.raises(SystemExit, match="is in both"):
        bench.main(["--from_json", str(raw), str(small)])

    # --resume trains only what the --json file lacks
    again = bench.main(["--tasks", "gpt2", "--methods", "adamw_warmup", "adamweyl", "--lrs", "1e-3", "--taus", "0.01", "0.1",
                        "--seeds", "0", "--steps", "4", "--monitor_interval", "2", "--json", str(raw), "--resume"])
    assert [r.final_val_loss for r in again] == [r.final_val_loss for r in results]


def _run(bench, task, method, lr, seed, metric, tau=None, length=150, collapsed=False):
    return bench.RunResult(task, method, lr, seed, length, metric, metric, 1.0, 1.0, collapsed, None, False, 1.0, [],
                           tau=tau, total_steps=length)


def test_best_vs_best_picks_each_methods_best_setting_and_says_win_tie_lose(bench):
    R = lambda *a, **k: _run(bench, *a, **k)  # noqa: E731
    results = [
        # reference: AdamW + warmup, best at lr 3e-3 (mean 5.0)
        R("gpt2", "adamw_warmup", 1e-3, 0, 5.2), R("gpt2", "adamw_warmup", 1e-3, 1, 5.2),
        R("gpt2", "adamw_warmup", 3e-3, 0, 4.9), R("gpt2", "adamw_warmup", 3e-3, 1, 5.1),
        # AdamWeyl: best at τ 0.03, lr 1e-3 (4.99: within 0.02 -> ties); a collapsed-free setting
        R("gpt2", "adamweyl", 1e-3, 0, 5.5, tau=0.01), R("gpt2", "adamweyl", 1e-3, 1, 5.5, tau=0.01),
        R("gpt2", "adamweyl", 1e-3, 0, 4.98, tau=0.03), R("gpt2", "adamweyl", 1e-3, 1, 5.0, tau=0.03),
        R("gpt2", "adamweyl", 3e-3, 0, 5.3, tau=0.03), R("gpt2", "adamweyl", 3e-3, 1, 5.3, tau=0.03),
        # AdamW without warmup: loses; one of its seeds diverged (NaN) at the higher rate
        R("gpt2", "adamw", 1e-3, 0, 5.3), R("gpt2", "adamw", 1e-3, 1, 5.3),
        R("gpt2", "adamw", 3e-3, 0, float("nan"), collapsed=True), R("gpt2", "adamw", 3e-3, 1, 4.0),
        # ViT: accuracy, higher is better
        R("vit", "adamw_warmup", 1e-3, 0, 0.90), R("vit", "adamweyl", 1e-3, 0, 0.93, tau=0.01),
    ]
    best = {(b.task, b.method): b for b in bench.best_settings(results)}
    assert (best["gpt2", "adamw_warmup"].lr, best["gpt2", "adamw_warmup"].metric) == (3e-3, pytest.approx(5.0))
    assert best["gpt2", "adamw_warmup"].edge == "lr high"
    b = best["gpt2", "adamweyl"]
    assert (b.lr, b.tau, b.metric, b.settings, b.edge) == (1e-3, 0.03, pytest.approx(4.99), 3, "lr low, τ high")
    assert best["gpt2", "adamw"].lr == 1e-3  # a NaN seed makes a setting the worst, whatever its other seed did
    assert bench.verdict("gpt2", 4.99, 5.0)[1] == "ties" and bench.verdict("gpt2", 4.9, 5.0)[1] == "wins"
    assert bench.verdict("vit", 0.93, 0.90) == (pytest.approx(0.03), "wins")
    table = bench.best_vs_best(results)
    assert "| gpt2 | 150 | adamweyl | 0.001 | 0.03 | 4.990 | 4.980 / 5.000 | 0/2 | 3 | +0.010 | ties | lr low, τ high |" in table
    assert "| gpt2 | 150 | adamw | 0.001 | – | 5.300 | 5.300 / 5.300 | 0/2 | 2 | -0.300 | loses |" in table
    assert "| vit | 150 | adamweyl | 0.001 | 0.01 | 0.930 |" in table and "| +0.030 | wins |" in table


def test_bert_post_ln_task_with_admin(bench):
    results = bench.main(["--tasks", "bert", "--methods", "adamw", "admin_adamw", "admin_adamweyl", "--lrs", "1e-3",
                          "--seeds", "0", "--steps", "3", "--monitor_interval", "3"])
    by = {r.method: r for r in results}
    for r in results:  # masked-LM loss from ln(vocab) ≈ 7.6 down a little; the monitor reads BERT's attention
        assert 6.0 < r.final_val_loss < 8.0 and 0 < r.min_entropy < 4.2 and r.max_sigma_qk > 0
    assert by["admin_adamweyl"].tau == 0.01 and by["adamw"].tau is None
    # Admin changes the model (trainable ω) but at initialisation ω ≈ 1 for HF's small init: close, not identical
    assert by["admin_adamw"].final_val_loss != by["adamw"].final_val_loss
    assert abs(by["admin_adamw"].final_val_loss - by["adamw"].final_val_loss) < 0.05


def test_mlm_mask_follows_berts_recipe(bench):
    import torch

    ids = torch.randint(0, 100, (64, 64))
    inputs, labels = bench.mlm_mask(ids, torch.Generator().manual_seed(0), mask_id=100, vocab_size=100)
    chosen = labels != -100
    assert 0.13 < float(chosen.float().mean()) < 0.17 and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    masked = float((inputs[chosen] == 100).float().mean())
    kept = float((inputs[chosen] == ids[chosen]).float().mean())
    assert 0.76 < masked < 0.84 and 0.08 < kept < 0.14  # 80 % [MASK]; 10 % kept (+ random draws equal to the token)


def test_bad_arguments_are_rejected(bench):
    for argv in (["--lrs", "-1"], ["--methods", "sgd"], ["--taus", "0"], ["--steps", "0"], ["--resume"],
                 ["--tasks", "gpt2", "--methods", "admin_adamw"], ["--tasks", "gpt2", "--methods", "adamw", "--taus", "0.1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_tau_map_marks_good_taus_and_checks_a_rule(bench, tmp_path):
    import tau_map

    R = lambda *a, **k: _run(bench, *a, **k)  # noqa: E731
    results = []
    for length, ref, by_tau in ((150, 6.00, {0.01: 6.50, 0.1: 6.01}), (600, 5.00, {0.01: 4.95, 0.1: 5.20})):
        for seed in (0, 1):
            results += [R("gpt2", "adamw_warmup", 1e-3, seed, ref, length=length),
                        R("gpt2", "adamw_warmup", 3e-3, seed, ref + 0.1, length=length)]
            for tau, metric in by_tau.items():
                results += [R("gpt2", "adamweyl", 1e-3, seed, metric, tau=tau, length=length),
                            R("gpt2", "adamweyl", 1e-2, seed, metric + 0.3, tau=tau, length=length,
                              collapsed=(tau == 0.01 and length == 600))]
    refs, cells = tau_map.tau_map(results)
    assert refs["gpt2", 150].lr == 1e-3 and cells["gpt2", 600, 0.01].lr == 1e-3  # best lr per τ, not the collapsed one
    assert cells["gpt2", 150, 0.1].good("gpt2") and not cells["gpt2", 150, 0.01].good("gpt2")
    assert cells["gpt2", 600, 0.01].gain == pytest.approx(0.05) and cells["gpt2", 600, 0.01].good("gpt2")
    md = tau_map.table("gpt2", refs, cells)
    assert "| AdamWeyl τ = 0.01 | -0.500 (lr 0.001) ✗ | +0.050 (lr 0.001) ✓ |" in md
    assert "| best τ | τ 0.1 | τ 0.01 |" in md
    # τ = 15/T: 0.1 at 150 steps (good), 0.025 at 600 (nearest measured 0.01 is a factor 2.5 away: not measured)
    assert [v for *_, v in tau_map.check_rule(15, refs, cells)] == ["good (τ 0.1)", "not measured"]
    assert [v for *_, v in tau_map.check_rule(1.5, refs, cells)] == ["not good (τ 0.01)", "not measured"]
    assert [v for *_, v in tau_map.check_rule(6, refs, cells)] == ["not measured", "good (τ 0.01)"]
    raw = tmp_path / "r.json"
    bench.save_results(results, str(raw), history=False)
    text = tau_map.main([str(raw), "--rule", "6", "--img", str(tmp_path / "map.png")])
    assert "| gpt2 | 600 | 0.01 | good (τ 0.01) |" in text and (tmp_path / "map.png").stat().st_size > 5000
