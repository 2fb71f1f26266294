"""A container's own layer: an overlayfs upper directory over one version of its image.

The container's files (hostname, machine-id, keys, units) are written straight into
the upper directory before the first mount; everything else it changes at run time
lands there too. N containers cost one image plus N layers.

With a user namespace (nspawnctl.userns) every file of a layer belongs to the
container's uid range on disk: guest uid N is host uid `uid_base`+N."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePath

from nspawnctl.errors import OperationError
from nspawnctl.paths import Paths
from nspawnctl.run import run
from nspawnctl.userns import base_of, shift_ownership, unescape_mountinfo, version_of


@dataclass(frozen=True)
class Layer:
    path: Path  # holds upper/ and work/

    @classmethod
    def of(cls, paths: Paths, name: str) -> Layer:
        return cls(cls.directory(paths) / name)

    @staticmethod
    def directory(paths: Paths) -> Path:
        """Where every container's layer is."""
        return paths.state_dir / "layers"

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def work(self) -> Path:
        return self.path / "work"

    @property
    def uid_base(self) -> int:
        """Host uid of the guest's uid 0 (0: the container has no user namespace)."""
        return base_of(self.upper)

    def mount_options(self, lower: Path) -> str:
        return f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"

    def make_dirs(self, relative: Path, lower: Path) -> Path:
        """Create `relative`'s directories in the upper layer with the image's modes and
        owners: an upper directory's attributes win over the image's, so a plain
        mkdir would turn /root's 0700 into 0755. `lower` is the image version itself
        (owned by 0 on disk); the owners are moved into the layer's uid range."""
        base = self.uid_base
        current = self.upper
        for part in relative.parts:
            current = current / part
            below = lower / current.relative_to(self.upper)
            if current.is_dir():
                continue
            if below.is_dir() and not below.is_symlink():
                st = below.stat()
                current.mkdir(mode=0o700)
                os.chown(current, base + st.st_uid, base + st.st_gid)
                current.chmod(st.st_mode & 0o7777)
            else:
                current.mkdir(mode=0o700 if part == ".ssh" else 0o755)
                os.chown(current, base, base)
        return current

    def write(self, relative: PurePath, text: str, mode: int, lower: Path) -> None:
        """Write a file of the guest (owned by its root) into the layer, at `relative`
        to the container's root; see make_dirs for `lower`."""
        # Here, not at the top: install imports render, which imports this module.
        from nspawnctl.install import write_atomic  # noqa: PLC0415

        directory = self.make_dirs(Path(relative.parent), lower)
        write_atomic(directory / relative.name, text, mode)
        base = self.uid_base
        os.chown(directory / relative.name, base, base)


def reown_layer(layer: Layer, base: int) -> None:
    """Move a layer into uid range `base` (0: for a container without a user namespace),
    from whichever range it is in: for a layer that comes from another container or
    another host (an import, a restored snapshot), or when `security.user_namespace`
    changes. The container must be stopped; its units must be rendered for `base`."""
    shift_ownership(layer.upper, layer.uid_base, base)


def used_uid_bases(layers_dir: Path, *, but: Collection[str]) -> set[int]:
    """The uid bases of every layer in `layers_dir` but those named in `but` (layers
    being made or restored, hidden ones, count: they are about to be taken)."""
    used = set()
    for entry in os.scandir(layers_dir) if layers_dir.is_dir() else ():
        if entry.name not in but and entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                used.add(Layer(Path(entry.path)).uid_base)
    return used


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
    """Every overlay mount of this namespace: mount point -> the image version under it
    (its first lower directory, or the image version an ID-mapped lower shows)."""
    found = {}
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] != "overlay":
                continue
            for option in fields[separator + 3].split(","):
                if option.startswith("lowerdir="):
                    lower = unescape_mountinfo(option.removeprefix("lowerdir=")).split(":")[0]
                    found[Path(unescape_mountinfo(fields[4]))] = version_of(Path(lower))
    return found


def mounted_lower(where: Path) -> Path | None:
    """The image version an overlay mounted at `where` uses, or None if not mounted."""
    return overlay_lowers().get(where)
