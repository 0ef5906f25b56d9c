"""Errors that are the user's to fix: printed as their message alone, exit status 1 (``HYDRA_FULL_ERROR=1``
shows the traceback), by Hydra under train.py and ``python -m lra.bench``, by :func:`run_cli` elsewhere. Any
other exception is a bug and keeps its traceback. Each also derives from the built-in type callers catch."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import CompactHydraException

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
T = TypeVar("T")


class UserError(CompactHydraException):
    """A problem with the command line, the config or the files the user pointed at."""

    def __str__(self) -> str:
        # Notes added on the way up are part of the message; the compact report would drop them.
        return "\n".join([super().__str__(), *getattr(self, "__notes__", [])])


class ConfigError(UserError, ValueError):
    """The composed config (or the command line) describes a run that cannot work."""


class DataError(UserError, ValueError):
    """Malformed input data: a file that does not parse, labels out of range, an empty split."""


class MissingDataError(UserError, FileNotFoundError):
    """Input data absent where the config says it is."""


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


def run_cli(main: Callable[[], T], prog: str) -> T:
    """Call ``main``; a :class:`UserError` becomes ``<prog>: <message>`` on stderr and exit status 1."""
    try:
        return main()
    except UserError as error:
        if os.environ.get(FULL_ERROR_ENV) == "1":
            raise
        print(f"{prog}: {error}", file=sys.stderr)
        print(
            f"\nSet the environment variable {FULL_ERROR_ENV}=1 for a complete stack trace.", file=sys.stderr
        )
        raise SystemExit(1) from None
