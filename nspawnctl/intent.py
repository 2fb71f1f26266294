"""Changes that survive being cut short: a write-ahead record of each multi-step change.

`add` writes a config, a layer, host units, reloads systemd and starts a socket. An
exception takes all of that back (install.Undo); a `kill -9` or a power cut does not
run any code. So every step is recorded, as data, in STATE_DIR/intents/ before it is
taken, and the record is deleted once the change is complete. The next nspawnctl
command finds a record whose owner is gone (its lock is free) and settles it first:
the steps recorded are taken back in reverse (a cut-short `add` leaves nothing), or a
change that can only go forward (`remove`) is finished. Either way the host is back
to the old state or at the new one, never half-way."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from nspawnctl.atomic import write_atomic
from nspawnctl.bus import Systemd
from nspawnctl.faults import checkpoint
from nspawnctl.guesttree import GuestTree, remove_tree
from nspawnctl.install import Undo, remove_file
from nspawnctl.log import log

# Taking back: restore a file (None: delete it), delete a tree, delete an empty
# directory, reload systemd, stop a unit and forget its failure, thaw a frozen unit.
StepKind = Literal["file", "tree", "rmdir", "reload", "stop", "thaw"]


@dataclass(frozen=True)
class Step:
    kind: StepKind
    path: str = ""  # the file or directory; the unit for "stop"
    previous: str | None = None  # "file": what it held before; None: it did not exist
    mode: int = 0o644
    owner: int = 0  # "file": its uid and gid (a guest's file: its root's, see userns.py)
    # "file" of a guest: the root of its tree (a layer's upper/); `path` is then relative
    # to it, and the file is put back through guesttree, never through a link.
    root: str = ""


@dataclass(frozen=True)
class Record:
    verb: str  # what was cut short: "add", "remove", "apply", "set", ...
    name: str  # the container (or image key)
    forward: bool  # True: finish it on recovery (remove); False: take it back
    steps: tuple[Step, ...] = ()
    options: tuple[str, ...] = ()  # how to finish it: the command's options


class Intent:
    """The record of one change in progress, held locked by its process."""

    def __init__(
        self,
        directory: Path,
        verb: str,
        name: str,
        *,
        forward: bool = False,
        options: tuple[str, ...] = (),
    ) -> None:
        self.path = directory / f"{verb}-{name}.json"
        self.record = Record(verb, name, forward, options=options)
        self._fd = -1
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd = _open_locked(self.path)
            self._save()
        except OSError as err:
            # A full file system (a guest may fill it) must not lock the admin out of
            # `remove`, the way out: a change that only goes forward needs no record to
            # be taken back, and an interrupted one is finished by running it again.
            if not forward or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                self.close()
                raise
            log.warning("no room to record `%s %s` before it starts: going on without", verb, name)
            self.close()
            self.path.unlink(missing_ok=True)

    def add(self, step: Step) -> None:
        """Record a step BEFORE taking it: taking back one that never happened is safe."""
        self.record = replace(self.record, steps=(*self.record.steps, step))
        if self._fd >= 0:
            self._save()

    def _save(self) -> None:
        data = json.dumps(_to_data(self.record)).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_locked(path: Path) -> int:
    """The record's file, locked. Held until the change is complete; released by the
    kernel if the process dies, which is how recovery tells an abandoned record from one
    being written. A process that held the same name before us deletes its file when it
    is done: a lock on a file that no longer has the name is nobody's record, so open
    the name again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass  # deleted after our lock: open it again
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def take_back(step: Step, systemd: Systemd) -> None:
    """Undo one recorded step; each is harmless if the step was never taken."""
    path = Path(step.path)
    match step.kind:
        case "file" if step.root:
            tree = GuestTree(Path(step.root), step.root)
            if step.previous is None:
                tree.remove(step.path)
            else:
                owner = (step.owner, step.owner)
                make = lambda _relative: (0o755, *owner)  # noqa: E731
                tree.write(step.path, step.previous, step.mode, owner, create=make)
        case "file":
            if step.previous is None:
                remove_file(path)
            else:
                write_atomic(path, step.previous, step.mode, step.owner)
        case "tree":
            remove_tree(path)
        case "rmdir":
            with contextlib.suppress(FileNotFoundError, OSError):
                path.rmdir()
        case "reload":
            systemd.reload()
        case "stop":
            systemd.stop_and_forget(step.path)
        case "thaw":
            systemd.thaw(step.path)


class Transaction(Undo):
    """An Undo whose steps are also on disk: taken back by this process if it fails,
    and by the next nspawnctl if this one is killed. Use as `with Transaction(...) as t`;
    call `t.step(...)` just before each step is taken."""

    def __init__(
        self,
        directory: Path,
        verb: str,
        name: str,
        systemd: Systemd,
        *,
        forward: bool = False,
        options: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.systemd = systemd
        self.intent = Intent(directory, verb, name, forward=forward, options=options)
        self._guard = self.guard()

    def step(self, step: Step) -> None:
        self.intent.add(step)
        what = f"{step.kind} {step.path}" if step.path else step.kind
        self.push(what, lambda: take_back(step, self.systemd))
        checkpoint(f"{self.intent.record.verb} {step.kind} {step.path}")

    def __enter__(self) -> Transaction:
        self._guard.__enter__()
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        try:
            if kind is None:
                checkpoint(f"{self.intent.record.verb} complete")
            self._guard.__exit__(kind, value, traceback)
        finally:
            # Taken back or complete: either way nothing is left to settle.
            self.intent.done()


def abandoned(directory: Path) -> Iterator[tuple[Path, Record]]:
    """Records whose process is gone, each locked by us while the caller settles it."""
    for path in sorted(directory.glob("*.json")):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # finished meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is still at work
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    continue  # finished, and the name made anew by another change
            except FileNotFoundError:
                continue  # finished between our glob and our lock
            with os.fdopen(os.dup(fd), encoding="utf-8") as f:
                text = f.read()
            try:
                record = _from_data(json.loads(text))
            except (ValueError, KeyError, TypeError):
                # Killed while the record itself was first written: no step was taken.
                log.warning("discarding an unreadable change record %s", path)
                path.unlink(missing_ok=True)
                continue
            yield path, record
        finally:
            os.close(fd)


def _to_data(record: Record) -> dict[str, Any]:
    return asdict(record)


def _from_data(data: dict[str, Any]) -> Record:
    return Record(
        verb=str(data["verb"]),
        name=str(data["name"]),
        forward=bool(data["forward"]),
        steps=tuple(Step(**step) for step in data["steps"]),
        options=tuple(map(str, data.get("options", ()))),
    )
