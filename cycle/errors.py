"""Errors the user can fix. The entry points (`train.py`, `python -m eval`) print a `UserError` as one line
on stderr and exit 1; anything else is a bug and keeps its traceback.

Each subclass also derives from the built-in type callers caught before (ValueError, OSError, ...), so
existing `except` clauses keep working.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

__all__ = ["UserError", "ConfigError", "OutputError", "RunLocked", "Diverged", "CheckpointError",
           "output_error", "exit_on"]


class UserError(Exception):
    """A problem in the command, the settings, the data or the machine; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A setting out of its allowed range (the message names the key and the range)."""


class OutputError(UserError, OSError):
    """An output could not be written (disk full, read-only, impossible path)."""


class RunLocked(UserError, RuntimeError):
    """Another live process is writing the same run directory."""


class Diverged(UserError, RuntimeError):
    """Training produced a non-finite loss, gradient or weight; nothing non-finite is ever saved."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is unreadable (truncated, corrupt, not a checkpoint)."""


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
WRITE_ERRNOS = _FULL | {errno.EROFS}  # an OSError with one of these is a failed write, whatever raised it
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


def output_error(path: str | os.PathLike, exc: OSError, what: str = "output", keeps: str | None = None
                 ) -> OutputError:
    """One message for a failed write of `path`: which path, why, and what to do."""
    where = Path(getattr(exc, "filename", None) or path)
    why = exc.strerror or str(exc)
    why = why if where == Path(path) else f"{why} ({where})"
    if exc.errno in _FULL:
        todo = ("free space there, or write elsewhere (paths.output_dir=..., paths.artifacts_dir=..., "
                "or paths.root=...)")
    elif exc.errno in _READ_ONLY:
        todo = ("the folder is read-only or not yours: make it writable, or write elsewhere "
                "(paths.output_dir=..., paths.artifacts_dir=..., or paths.root=...)")
    elif exc.errno in _NOT_A_FOLDER:
        todo = "a file or link is in the way of that folder: move it, or write elsewhere (paths.output_dir=...)"
    else:
        todo = "check that the folder exists and is writable, or write elsewhere (paths.output_dir=...)"
    kept = f" {keeps}" if keeps else ""
    err = OutputError(f"could not write the {what} {path}: {why}.{kept} To fix: {todo}")
    err.errno = exc.errno  # not (errno, message) args: str(err) stays the message alone
    return err


def exit_on(exc: UserError, log=None, code: int = 1) -> None:
    """The one way an entry point ends on a user error: one line on stderr, exit `code`."""
    line = " ".join(str(exc).split())
    if log is not None:
        log.error("%s", line)
    print(f"error: {line}", file=sys.stderr)
    sys.exit(code)
