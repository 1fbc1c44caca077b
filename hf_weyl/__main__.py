"""``python -m hf_weyl SCRIPT [ARGS...]``: run an unmodified script with ``optim="adamw_weyl"`` registered.

The script runs as if started with ``python SCRIPT [ARGS...]``: ``__name__ == "__main__"``, ``sys.argv``,
``sys.path[0]`` = the script's directory, its exit code, its traceback. ``python -m hf_weyl -m MODULE
[ARGS...]`` does the same for ``python -m MODULE``. Under launchers: ``accelerate launch -m hf_weyl SCRIPT``,
``torchrun -m hf_weyl SCRIPT``.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m hf_weyl SCRIPT [ARGS...]  |  python -m hf_weyl -m MODULE [ARGS...]"

#: What ``--help`` prints: plain text (the module docstring is reST).
HELP = f"""{USAGE}

Run an unmodified script with optim="adamw_weyl" registered with transformers' Trainer
(--optim adamw_weyl, --optim_args "tau=auto").

The script runs as if started with "python SCRIPT [ARGS...]": the same __name__ ("__main__"), sys.argv,
sys.path[0] (the script's directory), exit code and traceback. "python -m hf_weyl -m MODULE [ARGS...]" does
the same for "python -m MODULE [ARGS...]".

Under launchers:
  accelerate launch -m hf_weyl SCRIPT [ARGS...]
  torchrun --nproc_per_node N -m hf_weyl SCRIPT [ARGS...]"""


def _usage_error(message: str) -> None:
    print(f"python -m hf_weyl: {message} ({USAGE})", file=sys.stderr)
    sys.exit(2)


def _script_frames_only(tb):
    """The traceback from the first frame outside this launcher and runpy (what ``python SCRIPT`` shows)."""
    ours = os.path.abspath(__file__)
    while tb is not None and (
        os.path.abspath(tb.tb_frame.f_code.co_filename) == ours or tb.tb_frame.f_globals.get("__name__") == "runpy"
    ):
        tb = tb.tb_next
    return tb


def _run_file(path: str) -> None:
    """Execute a source file as ``python path`` does: a fresh ``__main__`` module (kept after the run),
    ``__file__`` absolute, compiled without this module's ``__future__`` flags."""
    import builtins
    import importlib.machinery
    import io
    import types

    path = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)  # as python: joined, not normalised
    with io.open_code(path) as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    main_module = types.ModuleType("__main__")
    main_module.__dict__.update(
        __file__=path, __cached__=None, __package__=None, __spec__=None, __builtins__=builtins,
        __loader__=importlib.machinery.SourceFileLoader("__main__", path),
    )
    if "__annotations__" in vars(sys.modules.get("__main__", main_module)):
        main_module.__annotations__ = {}  # the interpreter's own __main__ starts with one (python < 3.14)
    sys.modules["__main__"] = main_module
    exec(code, main_module.__dict__)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        _usage_error("no script given")
    if argv[0] in ("-h", "--help"):
        print(HELP)
        return
    module = argv[0] == "-m"
    if module and len(argv) < 2:
        _usage_error("-m needs a module name")
    target = argv[1] if module else argv[0]
    if not module and not os.path.exists(target):
        _usage_error(f"can't open file {target!r}: no such file")
    if module and not _module_exists(target):
        _usage_error(f"no module named {target!r}")

    import hf_weyl  # noqa: F401  (registers optim="adamw_weyl" when transformers loads its Trainer modules)

    try:
        if module:
            sys.argv = [target, *argv[2:]]  # runpy puts the module's path in argv[0], as python -m does
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            if os.path.isdir(target) or _is_zip(target):
                del sys.path[0]  # runpy puts the directory / zip archive first, as python does
                runpy.run_path(target, run_name="__main__")
            else:
                sys.path[0] = os.path.dirname(os.path.realpath(target))
                if target.endswith(".pyc"):
                    runpy.run_path(target, run_name="__main__")
                else:
                    _run_file(target)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:  # noqa: BLE001  (shown as python shows an uncaught exception, exit status 1)
        tb = _script_frames_only(err.__traceback__)
        sys.excepthook(type(err), err.with_traceback(tb), tb)
        sys.exit(1)


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that does not exist, or an empty/relative name
        return False


def _is_zip(path: str) -> bool:
    import zipfile

    return os.path.isfile(path) and not path.endswith((".py", ".pyc")) and zipfile.is_zipfile(path)


if __name__ == "__main__":
    main()
