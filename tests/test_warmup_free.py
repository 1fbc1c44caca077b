"""CI-sized run of benchmarks/warmup_free.py: two methods, one rate, a few steps (so the script cannot rot)."""

import importlib.util
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


def test_two_methods_one_rate_few_steps(bench, tmp_path):
    out = tmp_path / "table.md"
    raw = tmp_path / "seed0.json"
    results = bench.main(["--tasks", "gpt2", "--methods", "adamw", "adamweyl", "--lrs", "1e-3", "--seeds", "0",
                          "--steps", "4", "--monitor_interval", "2", "--output", str(out), "--img_dir", str(tmp_path),
                          "--json", str(raw)])
    assert [r.method for r in results] == ["adamw", "adamweyl"]
    for r in results:
        assert r.steps == 4 and math.isfinite(r.final_val_loss) and r.final_val_loss < 8.5
        assert 0 < r.min_entropy and r.max_sigma_qk > 0 and [h["step"] for h in r.history] == [1, 2, 4]
    table = out.read_text()
    assert "| gpt2 | adamw | 0.001 |" in table and "| gpt2 | adamweyl | 0.001 |" in table
    assert (tmp_path / "warmup_free_gpt2.png").stat().st_size > 5000

    # --from_json merges earlier runs (e.g. one file per seed) without training; a run twice is an error
    merged_md = tmp_path / "merged.md"
    merged = bench.main(["--from_json", str(raw), "--output", str(merged_md)])
    assert [(r.method, r.final_val_loss) for r in merged] == [(r.method, r.final_val_loss) for r in results]
    assert merged_md.read_text() == table
    with pytest.raises(SystemExit, match="is in both"):
        bench.main(["--from_json", str(raw), str(raw)])


def test_bad_arguments_are_rejected(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--lrs", "-1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "sgd"])
