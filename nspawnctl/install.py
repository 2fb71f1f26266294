"""Putting files in place without ever leaving half of them, and taking them away again."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nspawnctl.atomic import write_atomic
from nspawnctl.errors import OperationError
from nspawnctl.log import log
from nspawnctl.render import GENERATED_MARK, RenderedFile
from nspawnctl.run import run


def is_ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(GENERATED_MARK)
    except OSError:
        return False


def check_writable(path: Path) -> None:
    """Never overwrite a file that nspawnctl did not write."""
    if (path.exists() or path.is_symlink()) and not is_ours(path):
        raise OperationError(
            f"refusing to overwrite {path}: it was not written by nspawnctl",
            hint="move it away, or choose another container name",
        )


def restore_file(path: Path, previous: str | None, mode: int = 0o644, owner: int = 0) -> None:
    """Put back a file's previous text, or take it away if there was none (to undo)."""
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, previous, mode, owner)


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # A drop-in directory we emptied goes too; one holding anything else stays.
    if path.parent.name.endswith(".d"):
        with contextlib.suppress(FileNotFoundError, OSError):
            path.parent.rmdir()


def systemd_verify(staging: Path, units: Iterable[str]) -> tuple[int, list[str]]:
    """`systemd-analyze verify` of `units`, found first in `staging`: its exit code and
    what it said, line by line."""
    proc = run(
        ["systemd-analyze", "verify", "--man=no", *units],
        check=False,
        # Trailing ':' appends systemd's own directories after ours.
        env={"SYSTEMD_UNIT_PATH": f"{staging}:", "SYSTEMD_LOG_LEVEL": "warning"},
    )
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def verify_units(files: Iterable[RenderedFile], units: Iterable[str]) -> None:
    """Let systemd itself judge the rendered units before any of them is installed:
    they are staged in a directory searched before the system's unit directories."""
    with tempfile.TemporaryDirectory(prefix="nspawnctl-verify-") as staging:
        for file in files:
            target = Path(staging) / file.path.name
            if file.path.parent.name.endswith(".d"):
                target = Path(staging) / file.path.parent.name / file.path.name
            if target.suffix not in (".service", ".socket", ".mount", ".conf"):
                continue  # not units (.nspawn, .network, keys): nothing for systemd-analyze
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file.text)
        returncode, lines = systemd_verify(Path(staging), units)
        # Complaints about units we did not write (the host's own) are not ours to fix.
        problems = [ln for ln in lines if staging in ln or any(u in ln for u in units)]
        if returncode != 0 or problems:
            raise OperationError(
                "systemd rejects the generated units: " + "; ".join(problems or lines),
                hint="this is a bug in nspawnctl's templates; please report it",
            )


class Undo:
    """Remembers how to take back each step; runs them in reverse if the block fails."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, step: Callable[[], None]) -> None:
        self._steps.append((what, step))

    @contextmanager
    def guard(self) -> Iterator[Undo]:
        try:
            yield self
        except BaseException:
            for what, step in reversed(self._steps):
                try:
                    step()
                except Exception as err:  # keep undoing the rest
                    log.warning("while undoing %s: %s", what, err or type(err).__name__)
            raise
        self._steps.clear()
