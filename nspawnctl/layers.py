"""A container's own layer: an overlayfs upper directory over one version of its image.

The container's files (hostname, machine-id, keys, units) are written straight into
the upper directory before the first mount; everything else it changes at run time
lands there too. N containers cost one image plus N layers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.errors import OperationError
from nspawnctl.paths import Paths
from nspawnctl.run import run


@dataclass(frozen=True)
class Layer:
    path: Path  # holds upper/ and work/

    @classmethod
    def of(cls, paths: Paths, name: str) -> Layer:
        return cls(paths.state_dir / "layers" / name)

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def work(self) -> Path:
        return self.path / "work"

    def mount_options(self, lower: Path) -> str:
        return f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"

    def make_dirs(self, relative: Path, lower: Path) -> Path:
        """Create `relative`'s directories in the upper layer with the image's modes and
        owners: an upper directory's attributes win over the image's, so a plain
        mkdir would turn /root's 0700 into 0755."""
        current = self.upper
        for part in relative.parts:
            current = current / part
            below = lower / current.relative_to(self.upper)
            if current.is_dir():
                continue
            if below.is_dir() and not below.is_symlink():
                st = below.stat()
                current.mkdir(mode=0o700)
                os.chown(current, st.st_uid, st.st_gid)
                current.chmod(st.st_mode & 0o7777)
            else:
                current.mkdir(mode=0o700 if part == ".ssh" else 0o755)
        return current


def check_upper_filesystem(path: Path) -> None:
    """Refuse to put layers where overlayfs cannot use them: an overlay cannot be the
    upper layer of another overlay (the mount would fail at the container's boot)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if run(["stat", "--file-system", "--format=%T", existing]).stdout.strip() == "overlayfs":
        raise OperationError(
            f"{existing} is on overlayfs, which cannot hold a container's layer",
            hint="put NSPAWNCTL_STATE_DIR (default /var/lib/nspawnctl) on a real file system",
        )


def disk_usage(path: Path) -> int:
    """Bytes of disk a tree really takes (allocated blocks, hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(directory, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def overlay_lowers() -> dict[Path, Path]:
    """Every overlay mount of this namespace: mount point -> its (first) lower directory."""
    found = {}
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] != "overlay":
                continue
            for option in fields[separator + 3].split(","):
                if option.startswith("lowerdir="):
                    lower = _unescape(option.removeprefix("lowerdir=")).split(":")[0]
                    found[Path(_unescape(fields[4]))] = Path(lower)
    return found


def mounted_lower(where: Path) -> Path | None:
    """The image version an overlay mounted at `where` uses, or None if not mounted."""
    return overlay_lowers().get(where)


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return text.encode().decode("unicode_escape") if "\\" in text else text
