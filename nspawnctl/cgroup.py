"""What the kernel counts for a container's unit in the unified control-group tree:
memory, CPU time, tasks and IO, for `metrics` and `top`.

Read from the files of the unit's own control group, which the kernel writes; the guest
manages only the groups below it (nspawn delegates those), so it cannot change these.
A host whose controllers are on the legacy hierarchies (hybrid, as the test hosts here)
has only CPU time in the unified tree: what is not counted is left out, not shown as
zero."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.names import service_unit

CGROUP_ROOT = Path("/sys/fs/cgroup")
# systemd-nspawn@.service puts every container in machine.slice.
_SLICE = "machine.slice"
_MAX_READ = 64 << 10  # io.stat has a line per device; nothing here is longer


@dataclass(frozen=True)
class Usage:
    """What the kernel counted for a container; None where the host does not count it."""

    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None  # None: no limit (or not counted)
    cpu_seconds: float | None = None
    tasks: int | None = None
    io_read_bytes: int | None = None
    io_written_bytes: int | None = None


def _read(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, _MAX_READ).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _number(text: str | None) -> int | None:
    if text is None or not text.strip().isdigit():
        return None  # absent, or "max"
    return int(text.strip())


def _keyed(text: str | None, key: str) -> int | None:
    """A `key value` line of a flat-keyed file (cpu.stat)."""
    for line in (text or "").splitlines():
        name, _sep, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def _io(text: str | None) -> tuple[int | None, int | None]:
    """io.stat: `MAJ:MIN rbytes=N wbytes=N ...` per device, summed."""
    if text is None:
        return None, None
    read = written = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _sep, value = item.partition("=")
            if value.isdigit():
                read += int(value) if key == "rbytes" else 0
                written += int(value) if key == "wbytes" else 0
    return read, written


def usage(name: str, root: Path = CGROUP_ROOT) -> Usage:
    """The container's usage now; all None if it is not running or nothing is counted."""
    # On a hybrid host the unified tree is a named one, with no controllers: it still
    # counts CPU time (cpu.stat's core keys need no controller).
    unified = root if (root / "cgroup.controllers").exists() else root / "unified"
    group = unified / _SLICE / service_unit(name)
    cpu = _keyed(_read(group / "cpu.stat"), "usage_usec")
    read, written = _io(_read(group / "io.stat"))
    return Usage(
        memory_bytes=_number(_read(group / "memory.current")),
        memory_limit_bytes=_number(_read(group / "memory.max")),
        cpu_seconds=None if cpu is None else cpu / 1e6,
        tasks=_number(_read(group / "pids.current")),
        io_read_bytes=read,
        io_written_bytes=written,
    )
