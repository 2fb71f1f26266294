"""A container's own layer: an overlayfs upper directory over one version of its image.

The container's files (hostname, machine-id, keys, units) are written straight into
the upper directory before the first mount; everything else it changes at run time
lands there too. N containers cost one image plus N layers.

With a user namespace (nspawnctl.userns) every file of a layer belongs to the
container's uid range on disk: guest uid N is host uid `uid_base`+N."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from nspawnctl.atomic import write_atomic
from nspawnctl.disk import attach, has_disk, mount_point
from nspawnctl.disk import make as make_disk
from nspawnctl.errors import OperationError
from nspawnctl.guesttree import DirMaker, GuestTree
from nspawnctl.mounts import mounts, unescape
from nspawnctl.paths import Paths
from nspawnctl.resources import Resources
from nspawnctl.run import run
from nspawnctl.userns import base_of, shift_ownership, version_of

MACHINE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Layer:
    path: Path  # holds upper/ and work/

    @classmethod
    def of(cls, paths: Paths, name: str) -> Layer:
        return cls(cls.directory(paths) / name)

    @staticmethod
    def directory(paths: Paths) -> Path:
        """Where every container's layer is."""
        return paths.layers_dir

    def _holder(self, disk: bool | None = None) -> Path:
        """Where upper/ and work/ are: on the layer's own disk if it has one (disk.py)."""
        on_disk = has_disk(self.path) if disk is None else disk
        return mount_point(self.path) if on_disk else self.path

    @property
    def upper(self) -> Path:
        return self._holder() / "upper"

    @property
    def work(self) -> Path:
        return self._holder() / "work"

    @property
    def uid_base(self) -> int:
        """Host uid of the guest's uid 0 (0: the container has no user namespace)."""
        return base_of(self.upper)

    def mount_options(self, lower: Path, *, disk: bool) -> str:
        """The overlay's options; `disk`: whether the layer has (or is to have) a disk of
        its own, which the YAML says before the layer is made."""
        holder = self._holder(disk)
        return f"lowerdir={lower},upperdir={holder / 'upper'},workdir={holder / 'work'}"

    @property
    def tree(self) -> GuestTree:
        """The guest's files: touched only through this (guesttree.py)."""
        return GuestTree(self.upper, f"the layer of {self.path.name}")

    @property
    def identity_file(self) -> Path:
        """The container's machine-id as the host keeps it: beside upper/, out of the
        guest's reach. It names host paths (the journal directory) and goes into host
        units, so it is never read back from the guest's own /etc/machine-id."""
        return self.path / "machine-id"

    @property
    def machine_id(self) -> str | None:
        try:
            text = self.identity_file.read_text()
        except FileNotFoundError:
            return self._adopt_guest_machine_id()
        return checked_machine_id(text.strip(), str(self.identity_file))

    def _adopt_guest_machine_id(self) -> str | None:
        """A layer made before the host kept its machine-id: the guest's, checked as data
        once, then kept on the host (a root-only write) so it is never read again."""
        if not self.upper.is_dir():
            return None
        try:
            text = self.tree.read_text("etc/machine-id", limit=64)
        except OSError:
            return None
        mid = (text or "").strip()
        if not MACHINE_ID.fullmatch(mid):
            return None
        with contextlib.suppress(OSError):  # not root: read-only verbs still work
            self.keep_machine_id(mid)
        return mid

    @property
    def record_file(self) -> Path:
        """What nspawnctl last wrote into the guest's tree, a SHA-256 per file, kept
        beside upper/: a guest file that no longer matches was changed in the guest, by
        its user, and `apply` leaves it be while the YAML says nothing new for it."""
        return self.path / "guest-files"

    def written(self) -> dict[str, str] | None:
        """The record: relative path -> digest. None for a layer made before it."""
        try:
            text = self.record_file.read_text()
        except FileNotFoundError:
            return None
        record: dict[str, str] = {}
        for line in text.splitlines():
            digest, _, relative = line.partition("  ")
            record[relative] = digest
        return record

    def keep_machine_id(self, mid: str) -> None:
        write_atomic(self.identity_file, checked_machine_id(mid, "machine-id") + "\n", 0o600)

    def write(self, relative: PurePath, text: str, mode: int, lower: Path) -> None:
        """Write a file of the guest (owned by its root) into the layer, at `relative`
        to the container's root, never through a link. Missing directories get the
        image's modes and owners: an upper directory's attributes win over the image's,
        so a plain mkdir would turn /root's 0700 into 0755. `lower` is the image version
        itself (owned by 0 on disk); owners are moved into the layer's uid range."""
        base = self.uid_base
        self.tree.write(
            PurePosixPath(relative), text, mode, (base, base), create=self.dir_maker(lower)
        )

    def dir_maker(self, lower: Path) -> DirMaker:
        base = self.uid_base

        def make(relative: str) -> tuple[int, int, int]:
            with contextlib.suppress(OSError):
                st = os.lstat(lower / relative)  # the image: the store's, trusted
                if stat.S_ISDIR(st.st_mode):
                    return stat.S_IMODE(st.st_mode), base + st.st_uid, base + st.st_gid
            return (0o700 if relative.endswith(".ssh") else 0o755), base, base

        return make


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record_text(files: Iterable[tuple[PurePath, str]]) -> str:
    """The record of `files` (path relative to the guest's root, text), in the layout of
    sha256sum(1)."""
    return "".join(f"{digest(text)}  {path}\n" for path, text in sorted(files))


def checked_machine_id(text: str, where: str) -> str:
    """A machine-id is 32 lowercase hex digits: anything else is refused, whoever wrote
    it (it becomes a host path and a word of a host unit)."""
    if not MACHINE_ID.fullmatch(text):
        raise OperationError(
            f"{where}: not a machine-id (32 hexadecimal digits)",
            hint="nspawnctl keeps each container's machine-id itself; see SECURITY in nspawnctl(1)",
        )
    return text


def prepare(layer: Layer, resources: Resources) -> None:
    """The directory of a layer being built (a staging one), with its own disk, mounted,
    if the YAML gives one (`resources.disk`); its upper/ and work/ are made there next."""
    layer.path.mkdir(mode=0o700, parents=True)
    if resources.disk is not None:
        make_disk(layer.path, resources.disk, resources.inodes)


def attach_disks(layers_dir: Path) -> None:
    """Mount the disk of every layer that has one and is not mounted (after a reboot,
    before its container started): nspawnctl then finds every layer where it is."""
    for entry in os.scandir(layers_dir) if layers_dir.is_dir() else ():
        if entry.is_dir(follow_symlinks=False) and has_disk(Path(entry.path)):
            attach(Path(entry.path))  # mounts only one that is not


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


def overlay_lowers() -> dict[Path, Path]:
    """Every overlay mount of this namespace: mount point -> the image version under it
    (its first lower directory, or the image version an ID-mapped lower shows)."""
    found = {}
    for mount in mounts():
        if mount.fstype != "overlay":
            continue
        for option in mount.options:
            if option.startswith("lowerdir="):
                lower = unescape(option.removeprefix("lowerdir=")).split(":")[0]
                found[mount.where] = version_of(Path(lower))
    return found


def mounted_lower(where: Path) -> Path | None:
    """The image version an overlay mounted at `where` uses, or None if not mounted."""
    return overlay_lowers().get(where)
