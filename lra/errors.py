"""Errors that are the user's to fix, and how the entry points report them.

A :class:`UserError` (missing or malformed data, an impossible config, a bad resume directory, ...) is
printed as its message alone on stderr, and the command exits with status 1; any other exception is a bug and
keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback of user errors too.

Two places apply this rule:

* Hydra entry points (``train.py``, ``python -m lra.bench``): Hydra's own error reporting prints a
  :class:`hydra.errors.CompactHydraException` as its message (and honours ``HYDRA_FULL_ERROR``), so
  ``UserError`` derives from it and needs no handler of its own there.
* Everything else (the code train.py runs before Hydra, the analyses' argparse entry points):
  :func:`run_cli`.

Each concrete error also derives from the built-in type that code raised before (``ValueError``,
``FileNotFoundError``, ...), so callers that catch those keep working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import CompactHydraException

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
T = TypeVar("T")


class UserError(CompactHydraException):
    """A problem with the command line, the config or the files the user pointed at; the message says how
    to fix it."""

    def __str__(self) -> str:
        # Notes added on the way up (data/base.py says "nothing was cached") are part of the message: the
        # compact report prints str(error), which would otherwise drop them.
        return "\n".join([super().__str__(), *getattr(self, "__notes__", [])])


class ConfigError(UserError, ValueError):
    """The composed config (or the command line) describes a run that cannot work."""


class DataError(UserError, ValueError):
    """Input data that is malformed: a file that does not parse, labels out of range, an empty split."""


class MissingDataError(UserError, FileNotFoundError):
    """Input data that is absent where the config says it is."""


class DataDirError(UserError, PermissionError):
    """The data directory cannot be created or written."""


class CacheError(UserError, RuntimeError):
    """A cache folder that is incomplete or corrupt (deleting it and rerunning rebuilds it)."""


class ResumeError(UserError, ValueError):
    """``resume=`` or a reused run directory that cannot be continued."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A run directory or checkpoint path without the checkpoint it should hold."""


class OutputExistsError(UserError, FileExistsError):
    """An output folder that already holds results this command would mix with or overwrite."""


def full_traceback_requested() -> bool:
    """True when the user asked for tracebacks of user errors (the variable Hydra itself reads)."""
    return os.environ.get(FULL_ERROR_ENV) == "1"


def run_cli(main: Callable[[], T], prog: str) -> T:
    """Call ``main``; a :class:`UserError` becomes ``<prog>: <message>`` on stderr and exit status 1.

    Args:
        main: the entry point, without arguments (it reads ``sys.argv`` itself).
        prog: the command as the user typed it, e.g. ``python -m lra.analysis.heads``.
    """
    try:
        return main()
    except UserError as error:
        if full_traceback_requested():
            raise
        print(f"{prog}: {error}", file=sys.stderr)
        print(
            f"\nSet the environment variable {FULL_ERROR_ENV}=1 for a complete stack trace.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
