"""``python -m hf_weyl SCRIPT``: an unmodified script (one that never imports hf_weyl) gets optim="adamw_weyl",
and runs as under ``python SCRIPT``: argv, __main__, sys.path[0], __file__, exit code, traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

UNMODIFIED = textwrap.dedent("""
    import json, sys
    from dataclasses import dataclass, field
    from transformers import HfArgumentParser, TrainingArguments

    @dataclass
    class Extra:
        exit_code: int = field(default=0)

    parser = HfArgumentParser((TrainingArguments, Extra))
    training_args, extra = parser.parse_args_into_dataclasses()
    direct = TrainingArguments(output_dir=training_args.output_dir, optim="adamw_weyl", report_to="none")
    print(json.dumps({
        "argv": sys.argv, "name": __name__, "path0": sys.path[0], "file": __file__,
        "main_is_me": sys.modules["__main__"].__dict__ is globals(),
        "optim": str(training_args.optim.value), "direct": str(direct.optim.value),
    }))
    sys.exit(extra.exit_code)
""")

WHOAMI = textwrap.dedent("""
    import json, sys
    print(json.dumps({"argv": sys.argv, "name": __name__, "path0": sys.path[0], "file": __file__,
                      "main_file": sys.modules["__main__"].__file__, "main_is_me": sys.modules["__main__"].__dict__ is globals(),
                      "spec": repr(__spec__), "package": __package__, "annotations": __annotations__}))
    def f(x: "int") -> None: ...
    print(f.__annotations__)  # the launcher's `from __future__ import annotations` must not leak in
    raise SystemExit(int(sys.argv[-1]))
""")

RAISES = textwrap.dedent("""
    def inner():
        raise ValueError("bad value from the script")

    try:
        {}["missing"]
    except KeyError as err:
        try:
            inner()
        except ValueError as again:
            raise RuntimeError("while handling") from again
""")


def run(args: list[str], cwd: Path, launcher: str = "hf_weyl", timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", launcher, *args] if launcher else [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def scripts(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "train.py").write_text(UNMODIFIED)
    (tmp_path / "scripts" / "raises.py").write_text(RAISES)
    (tmp_path / "scripts" / "whoami.py").write_text(WHOAMI)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_unmodified_script_gets_adamw_weyl_as_if_run_directly(scripts):
    out = scripts / "out"
    args = ["../scripts/train.py", "--output_dir", str(out), "--optim", "adamw_weyl", "--report_to", "none",
            "--exit_code", "3"]
    proc = run(args, cwd=scripts / "elsewhere")
    assert proc.returncode == 3, proc.stderr[-3000:]
    seen = last_json(proc.stdout)
    assert seen["argv"] == args
    assert seen["name"] == "__main__" and seen["main_is_me"]
    assert seen["path0"] == str((scripts / "scripts").resolve())
    assert seen["optim"] == "adamw_weyl" and seen["direct"] == "adamw_weyl"
    # ... which python alone cannot do: transformers' own message, hence the launcher (README, first screen)
    direct = run(args, cwd=scripts / "elsewhere", launcher="")
    assert direct.returncode == 2 and "invalid choice: 'adamw_weyl'" in direct.stderr


def test_same_module_state_and_exit_code_as_python(scripts):
    args = ["../scripts/whoami.py", "a b", "--flag", "7"]
    plain = run(args, cwd=scripts / "elsewhere", launcher="")
    launched = run(args, cwd=scripts / "elsewhere")
    assert plain.returncode == launched.returncode == 7
    assert launched.stdout == plain.stdout and launched.stderr == plain.stderr == ""
    assert "{'x': 'int', 'return': None}" in launched.stdout


def test_same_exit_code_and_traceback_as_python(scripts):
    plain = run(["scripts/raises.py"], cwd=scripts, launcher="")
    launched = run(["scripts/raises.py"], cwd=scripts)
    assert plain.returncode == launched.returncode == 1
    assert "RuntimeError: while handling" in plain.stderr and "bad value from the script" in plain.stderr
    assert launched.stderr == plain.stderr  # no launcher or runpy frames
    ok = run(["scripts/train.py", "--output_dir", str(scripts / "o"), "--optim", "adamw_weyl"], cwd=scripts)
    assert ok.returncode == 0, ok.stderr[-3000:]


def test_module_form(scripts):
    pkg = scripts / "elsewhere" / "mytools"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(UNMODIFIED)
    proc = run(["-m", "mytools.train", "--output_dir", str(scripts / "o"), "--optim", "adamw_weyl"], cwd=scripts / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = last_json(proc.stdout)
    assert seen["name"] == "__main__" and seen["optim"] == "adamw_weyl"
    assert seen["argv"][0] == str(pkg / "train.py") and seen["argv"][1:] == ["--output_dir", str(scripts / "o"), "--optim", "adamw_weyl"]


@pytest.mark.parametrize(
    "args,message",
    [([], "no script given"), (["missing.py", "--x"], "can't open file 'missing.py'"), (["-m"], "-m needs a module"),
     (["-m", "no_such_module_xyz"], "no module named 'no_such_module_xyz'")],
)
def test_usage_errors_are_one_line_exit_2(scripts, args, message):
    proc = run(args, cwd=scripts)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_under_torchrun_and_accelerate_launch(scripts, launcher):
    """``torchrun -m hf_weyl SCRIPT`` / ``accelerate launch -m hf_weyl SCRIPT`` (one CPU process)."""
    if launcher == "torchrun":
        head = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    else:
        head = ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["scripts/train.py", "--output_dir", str(scripts / "o"), "--optim", "adamw_weyl", "--exit_code", "0"]
    proc = run([*head, "-m", "hf_weyl", *args], cwd=scripts, launcher="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = last_json(proc.stdout)
    assert seen["optim"] == "adamw_weyl" and seen["argv"] == args and seen["name"] == "__main__"
