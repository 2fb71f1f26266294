"""This process's mount table (/proc/self/mountinfo), read in one place."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    where: Path
    fstype: str
    options: tuple[str, ...]  # the file system's own (super) options


def unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return text.encode().decode("unicode_escape") if "\\" in text else text


def mounts() -> Iterator[Mount]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 10 or "-" not in fields[6:]:
                continue
            dash = fields.index("-", 6)
            yield Mount(
                Path(unescape(fields[4])),
                fields[dash + 1],
                tuple(fields[dash + 3].split(",")) if len(fields) > dash + 3 else (),
            )


def is_mount_point(path: Path) -> bool:
    return any(m.where == path for m in mounts())


def beneath(path: Path) -> list[Path]:
    """Mount points below `path`, deepest first (the order to unmount them in)."""
    found = {m.where for m in mounts() if path in m.where.parents}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
