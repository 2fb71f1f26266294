"""Errors are objects: library code raises them, only `cli.main` turns them into exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class NspawnctlError(Exception):
    """An error the user can act on: one line of message, optionally a hint."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class OperationError(NspawnctlError):
    """Something failed while doing what was asked (exit 1)."""


class UsageError(NspawnctlError):
    """The command line asks for something impossible (exit 2)."""

    exit_code = 2


class ConfigError(NspawnctlError):
    """A configuration file is wrong; names the file, the key path and the bad value (exit 2)."""

    exit_code = 2

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
