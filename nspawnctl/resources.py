"""Resource limits: the `resources:` keys, as systemd properties of the container's unit.

One table says, for each key, how its value is read, what systemd calls it in a unit
file and over D-Bus (where `status` reads what systemd holds), and how the YAML
writes it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

# Binary multiples, as systemd reads MemoryMax= (1K = 1024).
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(?:i?B)?\Z", re.IGNORECASE)
_PERCENT_RE = re.compile(r"^(\d+)\s*%\Z")
_MIN_MEMORY = 16 << 20  # less cannot boot systemd, sshd and a shell
_MIN_DISK = 64 << 20
_MAX_TASKS = 4194304  # the kernel's pid_max limit


def _size(minimum: int, too_small: str) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        else:
            match = _SIZE_RE.match(str(value).strip())
            if not match or not isinstance(value, str):
                raise ValueError(f"{value!r} is not a size; e.g. 512M, 2G or bytes")
            size = int(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()]
        if size < minimum:
            raise ValueError(f"{value!r} is less than {_format_size(minimum)}, {too_small}")
        if size >= 1 << 60:
            raise ValueError(f"{value!r} is more than any machine has")
        return size

    return parse


parse_size = _size(_MIN_MEMORY, "too little to boot a container")
# The layer's own file system: its journal and metadata take a few MB of it.
parse_disk = _size(_MIN_DISK, "too little for a container's own files")


def parse_cpu(value: object) -> int:
    match = _PERCENT_RE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"{value!r} is not a percentage of one CPU; e.g. 50% or 200%")
    percent = int(match.group(1))
    if not 1 <= percent <= 100 * 1024:
        raise ValueError(f"{value!r}: expected 1% to 102400% (100% is one whole CPU)")
    return percent


def _integer(low: int, high: int, example: str) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{value!r} is not a whole number; e.g. {example}")
        if not low <= value <= high:
            raise ValueError(f"{value!r}: expected {low} to {high}")
        return value

    return parse


def _format_size(size: int) -> str:
    for suffix in "TGMK":
        if size % _SIZE_SUFFIXES[suffix] == 0:
            return f"{size // _SIZE_SUFFIXES[suffix]}{suffix}"
    return str(size)


@dataclass(frozen=True)
class _Key:
    parse: Callable[[object], int]
    yaml_value: Callable[[int], Any]
    # A property of the container's unit: its name in a unit file, its value there, and
    # its name over D-Bus (signature `t`, where `status` reads what systemd holds).
    # None: not systemd's (the disk keys: the layer's own file system, disk.py).
    unit_name: str | None = None
    unit_value: Callable[[int], str] = str
    bus_name: str | None = None


KEYS: dict[str, _Key] = {
    "memory": _Key(parse_size, _format_size, "MemoryMax", str, "MemoryMax"),
    # CPUQuota=50% is half a second of CPU time per second.
    "cpu": _Key(parse_cpu, lambda p: f"{p}%", "CPUQuota", lambda p: f"{p}%", "CPUQuotaPerSecUSec"),
    "tasks": _Key(_integer(16, _MAX_TASKS, "512"), int, "TasksMax", str, "TasksMax"),
    "io_weight": _Key(_integer(1, 10_000, "100"), int, "IOWeight", str, "IOWeight"),
    "disk": _Key(parse_disk, _format_size),
    "inodes": _Key(_integer(1024, (1 << 32) - 1, "100000"), int),
}


@dataclass(frozen=True)
class Resources:
    """Limits of the container's unit (and so of everything in the container); None is
    systemd's default: no limit, or the default weight."""

    memory: int | None = None  # bytes
    cpu: int | None = None  # percent of one CPU
    tasks: int | None = None
    io_weight: int | None = None
    disk: int | None = None  # bytes of the layer's own file system (disk.py)
    inodes: int | None = None  # files it can hold; with `disk` only

    def items(self) -> Iterator[tuple[str, int]]:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                yield field.name, value

    def unit_lines(self) -> list[str]:
        """`Name=value` lines for the [Service] section of the container's unit."""
        return [
            f"{KEYS[k].unit_name}={KEYS[k].unit_value(v)}"
            for k, v in self.items()
            if KEYS[k].unit_name is not None
        ]

    def yaml_data(self) -> dict[str, Any]:
        return {k: KEYS[k].yaml_value(v) for k, v in self.items()}

    def with_value(self, key: str, raw: object) -> Resources:
        """A copy with one key changed; ValueError names what is wrong with `raw`."""
        return replace(self, **{key: KEYS[key].parse(raw)})

    def without(self, key: str) -> Resources:
        """A copy with no limit for one key (systemd's default)."""
        return replace(self, **{key: None})
