"""Templates from an existing directory tree: a mounted disk, an unpacked tree, or the
running system's own `/` (physical-to-container migration).

One `cp --archive --one-file-system` copies the tree, preserving owners, modes,
xattrs, ACLs and hard links. cp has no --exclude, so the source is given to it in
pieces: every entry of the source's top directory, except those this module makes
itself (empty) and, down the way to them, except the directories an image must not
contain. cp copies a file system mounted deeper down as an empty directory; one at
the top is made empty here, because cp copies whatever it is given as an argument."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.bootstrap import Bootstrapper, Progress
from nspawnctl.errors import OperationError
from nspawnctl.log import log
from nspawnctl.mounts import beneath
from nspawnctl.recipe import Recipe
from nspawnctl.run import run

# systemd-nspawn gives every container its own; a copied /dev is a door to the host's
# devices, and on a running system these are other file systems anyway.
EMPTIED = ("dev", "proc", "sys", "run")
# An image must not contain containers or images (the running system's own, when
# the source is `/`; the default store lives in the second).
SKIPPED = ("var/lib/machines", "var/lib/nspawnctl")
_BATCH = 500  # names per cp: far below ARG_MAX; hard links only hold within one cp


@dataclass(frozen=True)
class Plan:
    """How to copy `source`; paths relative to it."""

    source: Path
    device: int  # the source's file system: cp does not leave it
    through: tuple[str, ...]  # made here, on the way to SKIPPED; their entries are copied
    emptied: tuple[str, ...]  # made here, left empty: EMPTIED and mount points
    copied: tuple[str, ...]  # what cp copies, whole


class Directory(Bootstrapper):
    method = "directory"

    def check(self, recipe: Recipe) -> None:
        source = _source(recipe)
        if not source.is_dir():
            what = "no such directory" if not os.path.lexists(source) else "not a directory"
            raise OperationError(
                f"{source}: {what}",
                hint="the directory method copies a root filesystem tree; "
                "for an archive use method: tar",
            )
        if source == Path("/"):
            log.warning(
                "copying the running system's /: the image is the tree as it is at this "
                "moment, files being written now included; stop busy services first"
            )
        mounts = [str(source / rel) for rel in _mounts_below(source)]
        if mounts:
            log.warning(
                "not copied, other file systems mounted below %s (copied as empty directories): %s",
                source,
                " ".join(mounts[:10]) + (" ..." if len(mounts) > 10 else ""),
            )

    def build(self, recipe: Recipe, target: Path, progress: Progress) -> None:
        plan = make_plan(_source(recipe))
        _refuse_copy_into_itself(plan, target)
        made = (*plan.through, *plan.emptied)
        target.mkdir(mode=0o700)
        for rel in sorted(made):  # parents first
            (target / rel).mkdir(mode=0o700)
        for start in range(0, len(plan.copied), _BATCH):
            run(
                [
                    "env",
                    f"--chdir={plan.source}",  # cp --parents keeps the path as given
                    "cp",
                    "--archive",
                    "--one-file-system",
                    "--reflink=auto",
                    "--parents",
                    f"--target-directory={target}",
                    "--",
                    *plan.copied[start : start + _BATCH],
                ],
                progress=progress,
            )
        # Last, children first: making or filling a directory changes its times.
        for rel in (*sorted(made, reverse=True), ""):
            _copy_metadata(plan.source / rel, target / rel)


def _source(recipe: Recipe) -> Path:
    if not recipe.source:
        raise OperationError(f"{recipe.image}: method {recipe.method} needs a source")
    return Path(recipe.source).resolve()


def make_plan(source: Path) -> Plan:
    device = source.stat().st_dev
    through = {""}
    for skipped in SKIPPED:
        parts = Path(skipped).parts
        way = [os.path.join(*parts[:i]) for i in range(1, len(parts))]
        if os.path.lexists(source / skipped) and all(_is_own_dir(source / d, device) for d in way):
            through.update(way)
    emptied: list[str] = []
    copied: list[str] = []
    for directory in sorted(through):
        for entry in sorted(os.scandir(source / directory), key=lambda e: e.name):
            rel = os.path.join(directory, entry.name)
            if rel in through or rel in SKIPPED:
                continue
            if entry.is_dir(follow_symlinks=False) and (
                rel in EMPTIED or entry.stat(follow_symlinks=False).st_dev != device
            ):
                emptied.append(rel)
            else:
                copied.append(rel)
    return Plan(source, device, tuple(sorted(through - {""})), tuple(emptied), tuple(copied))


def _is_own_dir(path: Path, device: int) -> bool:
    """A real directory (no symlink) on the source's file system."""
    return path.is_dir() and not path.is_symlink() and path.lstat().st_dev == device


def _refuse_copy_into_itself(plan: Plan, target: Path) -> None:
    """The image store may be inside the source (it always is in `/`) if the copy does
    not go there: into a skipped or emptied directory, or onto another file system."""
    target = target.parent.resolve() / target.name
    if not target.is_relative_to(plan.source):
        return
    parts = target.relative_to(plan.source).parts
    for depth in range(1, len(parts)):
        rel = os.path.join(*parts[:depth])
        if rel in SKIPPED or rel in plan.emptied:
            return
        if (plan.source / rel).lstat().st_dev != plan.device:
            return
    raise OperationError(
        f"cannot copy {plan.source} into the image store inside it ({target.parent.parent})",
        hint="copy from a directory that does not hold the image store, or move the "
        "store (NSPAWNCTL_STATE_DIR) below /var/lib/nspawnctl or to another file system",
    )


def _copy_metadata(source: Path, target: Path) -> None:
    """Owner, mode, times, xattrs and ACLs (which are xattrs) of a directory; of a
    mount point, those of the mounted file system's root, as cp does."""
    st = source.stat()
    os.chown(target, st.st_uid, st.st_gid)  # before the mode: chown may clear set-id bits
    shutil.copystat(source, target)


def _mounts_below(source: Path) -> list[str]:
    """Other file systems mounted below `source` (relative paths), except below EMPTIED
    and SKIPPED. A bind mount of the source's own file system is not one: cp copies it."""
    device = source.stat().st_dev
    return sorted(
        rel
        for rel in _relative_mounts(source)
        if not any(rel == top or rel.startswith(f"{top}/") for top in (*EMPTIED, *SKIPPED))
        and _device(source / rel) != device
    )


def _device(path: Path) -> int | None:
    try:
        return path.stat().st_dev
    except OSError:  # gone, or a FUSE mount that root may not stat
        return None


def _relative_mounts(source: Path) -> Iterator[str]:
    try:
        points = beneath(source)
    except OSError:
        return
    for point in points:
        yield str(point.relative_to(source))
