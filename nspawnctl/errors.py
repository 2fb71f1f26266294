"""Errors are objects: library code raises them, only `cli.main` turns them into exit codes."""

from __future__ import annotations

import errno
import os
from enum import IntEnum
from pathlib import Path
from typing import ClassVar


class Exit(IntEnum):
    """nspawnctl's exit statuses (nspawnctl(1), EXIT STATUS): every verb returns one."""

    OK = 0
    FAILED = 1  # the operation failed; a fleet verb: it failed in some container
    USAGE = 2  # the command line or a configuration is wrong
    INTERRUPTED = 130  # as a shell reports SIGINT


class NspawnctlError(Exception):
    """An error the user can act on: one line of message, optionally a hint."""

    exit_code: ClassVar[Exit] = Exit.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class OperationError(NspawnctlError):
    """Something failed while doing what was asked (exit 1)."""


class UsageError(NspawnctlError):
    """The command line asks for something impossible (exit 2)."""

    exit_code = Exit.USAGE


class ConfigError(NspawnctlError):
    """A configuration file is wrong; names the file, the key path and the bad value (exit 2)."""

    exit_code = Exit.USAGE

    def __init__(
        self,
        file: Path | str,
        key: str,
        problem: str,
        *,
        hint: str | None = None,
    ) -> None:
        where = f"{_one_line(str(file))}: {_one_line(key)}" if key else _one_line(str(file))
        super().__init__(f"{where}: {problem}", hint=hint)
        self.file = str(file)
        self.key = key
        self.problem = problem


def _one_line(text: str) -> str:
    """A file name or key as the user wrote it, unless it holds a line break or another
    control character: an error is one line, and its key may come from the YAML."""
    return text if text.isprintable() else repr(text)


_OS_HINTS = {
    errno.ENOSPC: "that file system is full: free some space, then run the command again",
    errno.EDQUOT: "a disk quota is exhausted: free some space, then run the command again",
    errno.EROFS: "that file system is mounted read-only",
}


def from_os_error(err: OSError, context: str = "") -> OperationError:
    """An OSError nothing expected (a file that could not be read or written), as one
    line that says which file; "run it as root" only when not root and refused."""
    hint = _OS_HINTS.get(err.errno or 0)
    if hint is None and err.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
        hint = "nspawnctl changes the host's configuration: run it as root"
    return OperationError(f"{context}{err}", hint=hint)


def from_unexpected(err: Exception) -> OperationError:
    """Any other exception, when one container's failure must not stop the others."""
    if isinstance(err, OperationError):
        return err
    if isinstance(err, OSError):
        return from_os_error(err)
    return OperationError(
        f"internal error: {type(err).__name__}: {err}",
        hint="run again with --debug for the traceback, and report it",
    )
