"""Dependency tiers: ``import hf_weyl`` + an ``AdamWeyl`` step load torch (+ transformers) only; each tier's
modules import only what its extra declares; the declared DeepSpeed range is the tested one.
(The built wheel is checked end to end by scripts/check_wheel.sh, run by .ci/run.)"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENGINE_AND_RECIPE_LIBS = ("deepspeed", "accelerate", "datasets", "evaluate")


def run_fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT.parent)


def test_import_and_step_load_no_engine_or_recipe_library():
    proc = run_fresh(f"""
        import sys
        LIBS = {ENGINE_AND_RECIPE_LIBS!r}
        loaded = lambda names: [m for m in names if m in sys.modules]
        import hf_weyl
        assert not loaded(LIBS + ("matplotlib", "transformers.training_args", "transformers.trainer")), \\
            ("import hf_weyl", loaded(LIBS + ("matplotlib", "transformers.training_args", "transformers.trainer")))
        import torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        opt = hf_weyl.AdamWeyl(model.parameters(), lr=1e-3)
        model(torch.randn(4, 8)).square().sum().backward()
        opt.step()
        assert opt.last_stats is not None
        assert not loaded(LIBS), ("AdamWeyl(...) and step()", loaded(LIBS))
        import hf_weyl.monitor
        assert not loaded(("deepspeed", "datasets", "evaluate", "matplotlib")), ("import hf_weyl.monitor", loaded(LIBS))
        # registration still happens, when transformers loads its Trainer modules
        from transformers import HfArgumentParser, TrainingArguments
        (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(["--output_dir", "o", "--optim", "adamw_weyl"])
        assert parsed.optim == "adamw_weyl"
        from transformers.trainer import Trainer
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
        assert _OPTIMIZER_HANDLERS[parsed.optim].__module__ == "hf_weyl.integrations.trainer"
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_registration_when_transformers_was_imported_first():
    proc = run_fresh("""
        from transformers import TrainingArguments
        import hf_weyl
        assert TrainingArguments(output_dir="o", optim="adamw_weyl", report_to="none").optim == "adamw_weyl"
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_training_args_bin_from_another_process_loads_after_import_hf_weyl(tmp_path):
    path = tmp_path / "training_args.bin"
    saved = run_fresh(f"""
        import hf_weyl, torch
        from transformers import TrainingArguments
        torch.save(TrainingArguments(output_dir="o", optim="adamw_weyl", optim_args="tau=0.02", report_to="none"), {str(path)!r})
    """)
    assert saved.returncode == 0, saved.stderr[-3000:]
    loaded = run_fresh(f"""
        import sys, hf_weyl, torch
        assert "transformers.training_args" not in sys.modules
        args = torch.load({str(path)!r}, weights_only=False)  # imports transformers.training_args while unpickling
        assert args.optim == "adamw_weyl" and args.optim_args == "tau=0.02", args.optim
        print("ok")
    """)
    assert loaded.returncode == 0 and loaded.stdout.strip().endswith("ok"), loaded.stderr[-3000:]


# --- what each tier imports ---------------------------------------------------------------------------------------


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
        if name == "hf-weyl":  # "hf_weyl[recipes]": the extras it names
            for extra in re.search(r"\[(.*)\]", req).group(1).split(","):
                names |= _requirement_names(PYPROJECT["project"]["optional-dependencies"][extra.strip()])
        else:
            names.add(name)
    return names


def tier(*extras: str) -> set[str]:
    names = _requirement_names(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        names |= _requirement_names(PYPROJECT["project"]["optional-dependencies"][extra])
    return names


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Top-level names imported by a file; ``top_level_only``: only what runs at import (not in functions,
    not under ``if TYPE_CHECKING``)."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if top_level_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.add(child.module.split(".")[0])
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def distributions(files: list[Path], top_level_only: bool) -> dict[str, set[str]]:
    """Third-party distribution → files importing it."""
    by_module = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for f in files:
        for mod in _imports(f, top_level_only):
            sibling = (f.parent / f"{mod}.py").exists() or (f.parent / mod / "__init__.py").exists()
            if mod in sys.stdlib_module_names or mod == "hf_weyl" or sibling:  # scripts importing their neighbours
                continue
            for dist in by_module.get(mod, [mod]):
                out.setdefault(dist.lower().replace("_", "-"), set()).add(str(f.relative_to(ROOT)))
    return out


def py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_base_tier_is_torch_and_transformers():
    assert tier() == {"torch", "transformers"}


def test_core_integrations_monitor_import_only_the_base_tier_at_import_time():
    files = [ROOT / "hf_weyl" / "__init__.py", ROOT / "hf_weyl" / "__main__.py",
             *py_files("hf_weyl/core", "hf_weyl/integrations", "hf_weyl/monitor")]
    extra = {d: fs for d, fs in distributions(files, top_level_only=True).items() if d not in tier()}
    assert not extra, f"imported at import time but not in the base tier: {extra}"
    lazily = {d: fs for d, fs in distributions(files, top_level_only=False).items()
              if d not in tier("trainer", "deepspeed") | {"matplotlib"}}
    assert not lazily, f"imported (lazily) but declared in no extra of these tiers: {lazily}"


def test_recipe_support_and_recipes_need_only_the_recipes_tier():
    files = py_files("hf_weyl/recipe", "recipes")
    optional = {"torchvision"}  # ViT recipe's --randaugment/--mixup_alpha/--cutmix_alpha, checked at start-up
    missing = {d: fs for d, fs in distributions(files, top_level_only=False).items() if d not in tier("recipes") | optional}
    assert not missing, f"imported by recipe code but not in the [recipes] extra: {missing}"


def test_benchmarks_need_only_declared_extras():
    missing = {d: fs for d, fs in distributions(py_files("benchmarks"), top_level_only=False).items()
               if d not in tier("deepspeed", "benchmarks")}
    assert not missing, f"imported by benchmarks but declared nowhere: {missing}"


def test_dev_extra_is_everything():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert tier("dev") == tier(*extras) and "pytest" in tier("dev")


def test_declared_deepspeed_range_is_the_tested_one():
    from hf_weyl.integrations.deepspeed import TESTED_DEEPSPEED

    (low, high) = TESTED_DEEPSPEED
    (req,) = [r for r in PYPROJECT["project"]["optional-dependencies"]["deepspeed"] if r.startswith("deepspeed")]
    assert re.fullmatch(rf"deepspeed>={low[0]}\.{low[1]}(\.\d+)?,<{high[0]}\.{high[1]}", req), (req, TESTED_DEEPSPEED)


def test_package_data_ships_templates_and_metric_scripts():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["hf_weyl"]
    assert {"**/*.md", "**/*.py"} <= set(data)
    assert list((ROOT / "hf_weyl" / "recipe" / "model_cards").glob("*.md"))
    assert list((ROOT / "hf_weyl" / "recipe" / "metrics").rglob("*.py"))


@pytest.mark.parametrize("script", ["check_wheel.sh"])
def test_ci_runs_the_wheel_check(script):
    assert (ROOT / "scripts" / script).is_file()
    assert f"scripts/{script}" in (ROOT / ".ci" / "run").read_text()


# --- runs that never touch DeepSpeed never import it ------------------------------------------------------------------


def test_recipe_run_without_deepspeed_never_imports_it(tmp_path):
    """A plain (non-DeepSpeed) recipe run, through every place the loop unwraps the model (resume, the monitor, a
    checkpoint, the final config and Hub folder), leaves DeepSpeed unimported: accelerate's unwrap imports it whenever
    it is installed, and its import logs "Setting accelerator to CPU" into the progress bar."""
    recipe = ROOT / "recipes" / "pretrain_gpt2_openwebtext.py"
    common = ["--preset", "tiny", "--eval_steps", "2", "--max_eval_batches", "1", "--logging_steps", "1",
              "--monitor_steps", "1", "--checkpointing_steps", "1", "--max_train_steps", "2"]
    first = [*common, "--output_dir", str(tmp_path / "a")]
    resumed = [*common, "--output_dir", str(tmp_path / "b"),
               "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoints" / "step_1")]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell: DeepSpeed would warn
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import importlib.util, sys
        import torch
        torch.set_num_threads(1)
        spec = importlib.util.spec_from_file_location("recipe", {str(recipe)!r})
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        from accelerate.state import AcceleratorState, GradientState
        for argv in ({first!r}, {resumed!r}):
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            recipe.main(argv)
        assert "deepspeed" not in sys.modules, "a run without DeepSpeed imported deepspeed"
        print("ok")
    """)], capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    assert "Setting accelerator" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "b" / "checkpoints" / "step_2").is_dir() and "Resumed from" in proc.stdout
