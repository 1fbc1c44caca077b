"""The fused CPU step's build cache (hf_weyl.core.cpu_kernel): one folder per environment, a build that says so
once, and lock waits that end. Builds go to a temporary TORCH_EXTENSIONS_DIR, from a tiny stand-in source
(Python.h only, ~2 s to build) put in place of ``SOURCE``; the real kernel's build is covered by test_optimizer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import LIB_EXT

from hf_weyl.core import cpu_kernel as ck

TINY_SOURCE = r"""
#include <Python.h>
#define HFW_STR_(x) #x
#define HFW_STR(x) HFW_STR_(x)
#define HFW_CAT_(a, b) a##b
#define HFW_CAT(a, b) HFW_CAT_(a, b)
static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, HFW_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC HFW_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&tiny); }
"""

# The child: cpu_kernel() on the tiny source; prints whether a module came back and how long it took.
CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import hf_weyl.core.cpu_kernel as ck
    ck.SOURCE = Path(sys.argv[1])
    start = time.monotonic()
    module = ck.cpu_kernel()
    print(json.dumps({"built": module is not None, "seconds": time.monotonic() - start}))
""")

ANNOUNCE = "hf_weyl: building the fused CPU step"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny source, and TORCH_EXTENSIONS_DIR set to an empty folder (here and in the children)."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.setenv("HF_WEYL_CPU_KERNEL", "1")
    monkeypatch.delenv(ck.LOCK_TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(ck, "SOURCE", source)
    return source


def run_child(source: Path, timeout: float = 180, **env: str) -> tuple[dict, str]:
    """Run CHILD in a fresh interpreter (bounded by ``timeout``); its JSON result and its stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(source)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folder_is_per_environment(tiny, monkeypatch):
    here = ck.build_directory()
    assert here == ck.build_directory()  # same environment: same folder
    assert here.parent == Path(os.environ["TORCH_EXTENSIONS_DIR"])
    assert here.name.startswith("hf_weyl_cpu_")
    with monkeypatch.context() as m:
        m.setattr(sys, "prefix", "/elsewhere/other-venv")
        other_venv = ck.build_directory()
    with monkeypatch.context() as m:
        m.setattr(torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
        other_torch = ck.build_directory()
    with monkeypatch.context() as m:
        m.setattr(sys, "version", sys.version + " (another build)")
        other_python = ck.build_directory()
    assert len({here, other_venv, other_torch, other_python}) == 4


def test_build_announced_once_then_reused_silently(tiny):
    first, err = run_child(tiny)
    assert first["built"], err
    assert err.count(ANNOUNCE) == 1, err
    assert str(ck.build_directory()) in err
    folder = ck.build_directory()
    built = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    second, err = run_child(tiny)
    assert second["built"], err
    assert "hf_weyl" not in err, err  # loaded: nothing printed
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == built  # nothing rebuilt or rewritten


def test_lock_left_by_a_killed_build_does_not_hang(tiny):
    folder = ck.build_directory()
    folder.mkdir(parents=True)
    pid = dead_pid()
    (folder / ck._LOCK_NAME).write_text(f"pid {pid} on {socket.gethostname()}")
    (folder / "lock").write_text("")  # torch's baton, left by a builder killed midway (torch waits for it forever)
    work = folder / f"build-{pid}"  # the killed builder's work folder (with torch's baton too)
    work.mkdir()
    (work / "lock").write_text("")
    (work / "build.ninja").write_text("# half written\n")
    (work / "weyl_cpu.o").write_bytes(b"\0" * 100)
    start = time.monotonic()
    result, err = run_child(tiny, timeout=120)
    assert result["built"], err
    assert time.monotonic() - start < 120
    assert "cleared what a killed build left" in err, err
    assert sorted(p.name for p in folder.iterdir()) == sorted([ck._LOCK_NAME, folder.name + LIB_EXT])


@pytest.mark.skipif(ck.fcntl is None, reason="the test holds the lock with fcntl")
def test_lock_held_past_the_timeout_falls_back_to_eager(tiny):
    import fcntl

    folder = ck.build_directory()
    folder.mkdir(parents=True)
    with open(folder / ck._LOCK_NAME, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live builder
        held.write(f"pid {os.getpid()} on test-host")
        held.flush()
        result, err = run_child(tiny, timeout=60, **{ck.LOCK_TIMEOUT_ENV: "1"})
    assert not result["built"], err
    assert result["seconds"] < 30, result
    assert f"waiting for pid {os.getpid()} on test-host" in err, err
    assert "waited 1 s" in err and "using the eager step" in err and ck.LOCK_TIMEOUT_ENV in err, err
    assert ANNOUNCE not in err, err


def test_kernel_ab_says_which_revision_has_no_kernel():
    """benchmarks/kernel_ab.py (two kernel builds side by side) refuses a revision without the kernel source in one
    line, before building anything."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_ab.py"
    run = subprocess.run([sys.executable, str(script), "--base", "no-such-revision"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert "kernel_ab: no hf_weyl/core/csrc/weyl_cpu.cpp at revision 'no-such-revision'" in run.stderr
    assert "Traceback" not in run.stderr and "building" not in run.stderr
