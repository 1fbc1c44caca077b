"""The fused CPU step (``csrc/weyl_cpu.cpp``), built with ``torch.utils.cpp_extension`` on first use.

The eager step (:mod:`hf_weyl.core.functional`) reads and writes each matrix about 17 times per step; the
fused one three times (moments + U + first products; second products; update + the next step's first
weight product), which is what makes AdamW² cost about 2× ``AdamW(fused=True)`` on a CPU instead of 7×.

The build takes about 50 s (2-core CPU) once per environment: its folder ``hf_weyl_cpu_<key>`` in torch's
extension directory (``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``) is keyed on the source, the
flags, torch (version and install path) and the interpreter (``sys.prefix``, version), so two virtual
environments never share or rewrite one build. The build says so in one line on stderr; loading a finished
build prints nothing and runs no compiler. Builders of one folder take turns under an OS lock
(``hf_weyl.lock``, released by the kernel when its holder dies, so a killed build leaves nothing stale);
a process that waits longer than ``HF_WEYL_CPU_KERNEL_LOCK_TIMEOUT`` seconds (default 600) uses the eager
step, with a one-line warning. Where it cannot be built (no C++ compiler, an unsupported platform) the
eager step is used, with a one-line warning. ``HF_WEYL_CPU_KERNEL=0`` skips the build and uses the eager
step. Pre-build (e.g. in a Docker image): ``python -c "from hf_weyl.core.cpu_kernel import cpu_kernel;
print(cpu_kernel())"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = ["SOURCE", "build_directory", "cpu_kernel", "kernel_disabled"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "weyl_cpu.cpp"
LOCK_TIMEOUT_ENV = "HF_WEYL_CPU_KERNEL_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0
_LOCK_NAME = "hf_weyl.lock"  # an OS lock, never stale (torch's own baton, "lock", is in the build-<pid> folder)

_UNSET: Any = object()
_kernel: Any = _UNSET


class _LockTimeout(Exception):
    """Another live process held the build folder's lock past the timeout."""


def kernel_disabled() -> bool:
    return os.environ.get("HF_WEYL_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off")


def _isa_flags() -> list[str]:
    """Vector-ISA flags from what torch detected on this CPU (portable within the capability, unlike -march=native)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
    if capability.startswith("AVX2"):
        return ["-mavx2", "-mfma"]
    return []


def _flags() -> list[str]:
    return ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *_isa_flags()]


def _environment() -> list[str]:
    """What makes a build belong to one environment: the interpreter (prefix, version) and the torch install."""
    return [
        os.path.realpath(sys.prefix), sys.version, sys.implementation.cache_tag or "", platform.machine(),
        torch.__version__, os.path.realpath(os.path.dirname(torch.__file__)),
    ]


def _name() -> str:
    """``hf_weyl_cpu_<key>``, the key hashing the source, the flags and :func:`_environment`."""
    parts = "\0".join([*_environment(), *_flags()])
    return "hf_weyl_cpu_" + hashlib.sha256(SOURCE.read_bytes() + b"\0" + parts.encode()).hexdigest()[:12]


def build_directory() -> Path:
    """The folder this environment's build lives in (whether or not it is built yet)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / _name()


def _lock_timeout() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        warnings.warn(f"hf_weyl: {LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds; using "
                      f"{DEFAULT_LOCK_TIMEOUT_S:.0f}.", stacklevel=4)
        return DEFAULT_LOCK_TIMEOUT_S


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _acquire(lock_path: Path) -> int:
    """An exclusive OS lock on ``lock_path`` (its fd; closing it releases), waiting at most the lock timeout
    (then :class:`_LockTimeout`); a wait is announced in one line."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    if _try_lock(fd):
        return fd
    timeout = _lock_timeout()
    print(f"hf_weyl: waiting for {_holder(lock_path)} to finish building the fused CPU step in "
          f"{lock_path.parent} (at most {timeout:.0f} s, {LOCK_TIMEOUT_ENV}) ...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            holder = _holder(lock_path)
            os.close(fd)
            raise _LockTimeout(f"waited {timeout:.0f} s for {holder} holding {lock_path}")
        time.sleep(0.2)
    return fd


def _import_built(path: Path, name: str) -> Any | None:
    """The built module at ``path``, or None where there is none or it cannot be loaded (then it is rebuilt)."""
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a damaged module file
        return None
    return module


def _build() -> Any:
    """This environment's module: imported if built, else built (announced) under the lock.

    torch builds in a fresh ``build-<pid>`` subfolder (its own baton there cannot be stale, and a killed
    builder's orphaned compiler cannot write into the next build), then the module file is moved into place
    atomically, so it exists only complete."""
    from torch.utils.cpp_extension import LIB_EXT, load

    directory, name = build_directory(), _name()
    module_file = directory / f"{name}{LIB_EXT}"
    module = _import_built(module_file, name)
    if module is not None:
        return module
    directory.mkdir(parents=True, exist_ok=True)
    fd = _acquire(directory / _LOCK_NAME)
    try:
        module = _import_built(module_file, name)  # built by the process we waited for
        if module is not None:
            return module
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        # Under our lock no other builder of this folder is alive: what is left here is a killed build's.
        leftovers = [*directory.glob("build-*"), *[p for p in [directory / "lock"] if p.exists()]]  # + torch's baton
        for leftover in leftovers:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        note = " (cleared what a killed build left)" if leftovers else ""
        print(f"hf_weyl: building the fused CPU step (once per environment, ~1 min) in {directory}{note} ...",
              file=sys.stderr, flush=True)
        work = directory / f"build-{os.getpid()}"
        work.mkdir(exist_ok=True)
        module = load(name=name, sources=[str(SOURCE)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"],
                      build_directory=str(work), verbose=False)
        os.replace(work / module_file.name, module_file)
        shutil.rmtree(work, ignore_errors=True)
        module.__file__ = module.__spec__.origin = str(module_file)  # where the next processes load it from
        return module
    finally:
        os.close(fd)


def cpu_kernel() -> Any | None:
    """The compiled module (``weyl_step``), or None where it is disabled or cannot be built (then once a warning)."""
    global _kernel
    if _kernel is _UNSET:
        if kernel_disabled():
            _kernel = None
        else:
            try:
                _kernel = _build()
            except _LockTimeout as err:
                warnings.warn(
                    f"hf_weyl: {err} (another process building the fused CPU step); using the eager step, about "
                    f"3x slower on the CPU. Raise {LOCK_TIMEOUT_ENV}, or pre-build once with python -c \"from "
                    "hf_weyl.core.cpu_kernel import cpu_kernel; cpu_kernel()\".",
                    stacklevel=2,
                )
                _kernel = None
            except Exception as err:  # noqa: BLE001 - any build failure means: use the eager step
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(
                    f"hf_weyl: the fused CPU step could not be built ({first_line}); using the eager step, about "
                    "3x slower on the CPU. Install a C++ compiler to get it, or set HF_WEYL_CPU_KERNEL=0 to skip "
                    "the attempt.",
                    stacklevel=2,
                )
                _kernel = None
    return _kernel
