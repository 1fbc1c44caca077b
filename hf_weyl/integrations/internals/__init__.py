"""Other libraries' private attributes — one module per library, the only places hf_weyl reads them.

Every read goes through :func:`read`: a missing attribute (or one of an unexpected kind) raises a
``RuntimeError`` naming the library, its installed version and the versions hf_weyl is tested with, so
that a release that renames an internal makes hf_weyl refuse (fail closed) rather than silently do
something else. Each module lists what it reads and why.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["MISSING", "library_version", "read"]

#: Tells :func:`read` that the attribute's kind is not checked.
MISSING = object()

#: How each library's name is written in messages.
_DISPLAY = {"deepspeed": "DeepSpeed"}


def library_version(module_name: str) -> str:
    """The ``__version__`` of an imported library ("not imported" if it is not)."""
    module = sys.modules.get(module_name)
    return getattr(module, "__version__", "unknown") if module is not None else "not imported"


def read(library: str, tested: str, obj: Any, name: str, what: str, kind: Any = MISSING) -> Any:
    """``obj.<name>``, a private attribute of ``library`` (its module name; tested with versions ``tested``), for
    ``what``; a RuntimeError naming the library version if it is missing or (``kind``: a type or tuple of types) not
    of the expected kind."""
    value = getattr(obj, name, MISSING)
    if value is MISSING or (kind is not MISSING and not isinstance(value, kind)):
        owner = obj.__name__ if isinstance(obj, (type(sys), type)) else type(obj).__name__
        shown = _DISPLAY.get(library, library)
        raise RuntimeError(
            f"{shown} {library_version(library)} has no {owner}.{name} ({what}), which hf_weyl reads and is tested "
            f"with {shown} {tested}. Refusing to go on rather than guess; install a tested {shown} version or "
            "report this at hf_weyl."
        )
    return value
