"""User errors of the recipes: one line on stderr, exit code 2, no traceback.

A :class:`UserError` is a problem with what the user gave (options, data, files, a checkpoint); its
message names the value and what is valid. :func:`user_errors` turns it into ``<prog>: error: <message>``
and ``SystemExit(2)``, like ``argparse``. Every other exception is an internal error and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ArgumentParser", "UserError", "loading", "user_errors"]


class UserError(ValueError):
    """Bad user input, found at start-up; reported in one line (exit code 2) by :func:`user_errors`."""


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Report a :class:`UserError` raised inside as ``<prog>: error: <message>`` and exit with code 2."""
    try:
        yield
    except UserError as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@contextmanager
def loading(option: str, value: str | None) -> Iterator[None]:
    """Around a ``from_pretrained(value)``: a missing or unreadable ``value`` is a :class:`UserError` naming ``option``."""
    if value and value.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(value)):
        raise UserError(f"{option} {value!r}: no such folder (give a local folder saved with save_pretrained, or a Hub id)")
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as e:  # what from_pretrained raises for a missing path, repo or file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{option} {value!r} cannot be loaded: {first}") from None


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``<prog>: error: <message>``), exit code 2,
    without the usage block (``--help`` shows it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
