"""The fused CPU step (``csrc/weyl_cpu.cpp``), built with ``torch.utils.cpp_extension`` on first use.

The eager step (:mod:`hf_weyl.core.functional`) reads and writes each matrix about 17 times per step; the
fused one three times (moments + U + first products; second products; update + the next step's first
weight product), which is what makes AdamW² cost about 2× ``AdamW(fused=True)`` on a CPU instead of 7×.
The build takes 30–60 s once per machine and torch version (cached in torch's extension directory,
``TORCH_EXTENSIONS_DIR``); where it cannot be built (no C++ compiler, an unsupported platform) the eager
step is used, with a one-line warning. ``HF_WEYL_CPU_KERNEL=0`` skips the build and uses the eager step.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["SOURCE", "cpu_kernel", "kernel_disabled"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "weyl_cpu.cpp"

_UNSET: Any = object()
_kernel: Any = _UNSET


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


def _build() -> Any:
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *_isa_flags()]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([torch.__version__, *flags]).encode()).hexdigest()[:12]
    return load(name=f"hf_weyl_cpu_{key}", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                verbose=False)


def cpu_kernel() -> Any | None:
    """The compiled module (``weyl_step``), or None where it is disabled or cannot be built (then once a warning)."""
    global _kernel
    if _kernel is _UNSET:
        if kernel_disabled():
            _kernel = None
        else:
            try:
                _kernel = _build()
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
