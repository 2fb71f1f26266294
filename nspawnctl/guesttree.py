"""The one room for touching a tree that a guest wrote: a container's layer, a snapshot
or an export of it, an image being imported.

Root in a guest is hostile (SECURITY in nspawnctl(1)), and everything under such a tree
was written by it: any name may be a link to the host's files, a FIFO, a device, a
directory 100,000 levels deep, a 15 TiB sparse file. So, in the manner of systemd's
chase(): a path is opened one component at a time from a directory descriptor, with
O_NOFOLLOW, and a link on the way is an error, never followed (the guest's own links
stay the guest's business: nspawnctl never needs to go through one). A file is
opened O_PATH first and looked at before it is read, so neither a FIFO nor a device is
ever opened for reading. Walks hold one directory open at a time and go back up
through "..", checked against the inode they came down from, so they reach any depth
without recursion or running out of descriptors. Trees are copied, archived and
deleted by coreutils and tar, which do the same (fts) and keep sparse files sparse.

Nothing else in nspawnctl opens a path under a layer, a snapshot's layer or an image
being imported (tests/unit/test_guesttree.py checks the imports)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nspawnctl.errors import OperationError
from nspawnctl.run import run

# Files nspawnctl reads from a guest are its own small ones (a machine-id, a unit it
# wrote): anything longer is not one of them.
READ_LIMIT = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


# Mode, uid and gid for a directory to be made, by its path relative to the tree's root.
DirMaker = Callable[[str], tuple[int, int, int]]


class GuestPathError(OperationError):
    """A path in a guest's tree is not what nspawnctl can safely use (a link, a FIFO...)."""


def _parts(relative: PurePosixPath | str) -> tuple[str, ...]:
    """The components of a path relative to a guest's root; nspawnctl's own paths only
    (they come from its templates), so `..`, `.` and absolute paths are bugs."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ValueError(f"not a plain relative path: {str(relative)!r}")
    return parts


def _proc(fd: int) -> str:
    """The inode behind `fd` as a path: the kernel resolves /proc/self/fd/N to exactly
    that inode, whatever its names are now."""
    return f"/proc/self/fd/{fd}"


@dataclass(frozen=True)
class GuestTree:
    """A tree whose root directory is the host's (nspawnctl made it, e.g. a layer's
    upper/) and whose contents are the guest's."""

    root: Path
    what: str  # for messages: "the layer of web"

    def _refuse(self, relative: str, why: str) -> GuestPathError:
        return GuestPathError(
            f"{self.what}: /{relative} {why}; nspawnctl does not follow links or open "
            "special files in a guest's tree",
            hint="the guest has changed that path: put it back from inside the container "
            "(or remove the container)",
        )

    @contextlib.contextmanager
    def directory(
        self, relative: PurePosixPath | str = "", *, create: DirMaker | None = None
    ) -> Iterator[int]:
        """A descriptor of directory `relative` (the root when empty), reached without
        following a link. With `create`, missing directories are made with the mode and
        owner it gives for each (by its path relative to the root)."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            done: list[str] = []
            for part in _parts(relative) if str(relative) not in ("", ".") else ():
                done.append(part)
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if create is None:
                        raise
                    os.mkdir(part, 0o700, dir_fd=fd)  # opened to others once it is owned
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    mode, uid, gid = create("/".join(done))
                    os.fchown(child, uid, gid)
                    os.fchmod(child, mode)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._refuse("/".join(done), "is a link or not a directory") from None
                    raise
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def lstat(self, relative: PurePosixPath | str) -> os.stat_result | None:
        """What is at `relative` (None: nothing), without following a link at its end."""
        parts = _parts(relative)
        try:
            with self.directory("/".join(parts[:-1])) as fd:
                return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read(self, relative: PurePosixPath | str, limit: int = READ_LIMIT) -> bytes | None:
        """A regular file's bytes (None: not there). A link, a FIFO, a device or a file
        longer than `limit` is refused, and never opened for reading."""
        parts = _parts(relative)
        try:
            with self.directory("/".join(parts[:-1])) as parent:
                path_fd = os.open(parts[-1], _PATH_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse(str(relative), "is not a regular file")
            if st.st_size > limit:
                raise self._refuse(str(relative), f"is larger than {limit} bytes")
            fd = os.open(_proc(path_fd), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        finally:
            os.close(path_fd)
        with os.fdopen(fd, "rb") as file:
            data = file.read(limit + 1)
        if len(data) > limit:  # grew since fstat
            raise self._refuse(str(relative), f"is larger than {limit} bytes")
        return data

    def read_text(self, relative: PurePosixPath | str, limit: int = READ_LIMIT) -> str | None:
        data = self.read(relative, limit)
        return None if data is None else data.decode("utf-8", errors="replace")

    def write(
        self,
        relative: PurePosixPath | str,
        data: str | bytes,
        mode: int,
        owner: tuple[int, int],
        *,
        create: DirMaker | None = None,
    ) -> None:
        """Replace the file at `relative` whole (a reader sees the old or the new one),
        owned by `owner`. Missing directories are made by `create` (see `directory`);
        a link anywhere on the way is refused. A link at the end is replaced, not
        followed."""
        parts = _parts(relative)
        payload = data.encode() if isinstance(data, str) else data
        with self.directory("/".join(parts[:-1]), create=create) as parent:
            temporary = f".{parts[-1]}.nspawnctl-{os.getpid()}"
            fd = os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=parent,
            )
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(payload)
                    file.flush()
                    os.fchown(file.fileno(), *owner)
                    os.fchmod(file.fileno(), mode)  # after chown, which clears set-id bits
                    os.fsync(file.fileno())
                os.rename(temporary, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=parent)
                raise

    def remove(self, relative: PurePosixPath | str) -> bool:
        """Delete the file (or link, never what it points to) at `relative`; whether it
        was there."""
        parts = _parts(relative)
        try:
            with self.directory("/".join(parts[:-1])) as parent:
                os.unlink(parts[-1], dir_fd=parent)
        except FileNotFoundError:
            return False
        return True

    def names(self, relative: PurePosixPath | str) -> list[str]:
        """The names in directory `relative` (none if it is not there)."""
        try:
            with self.directory(relative) as fd:
                return os.listdir(fd)
        except FileNotFoundError:
            return []

    def chown(self, relative: PurePosixPath | str, uid: int, gid: int) -> None:
        """Give the file at `relative` (a link itself, never its target) to uid:gid."""
        parts = _parts(relative)
        with self.directory("/".join(parts[:-1])) as parent:
            os.chown(parts[-1], uid, gid, dir_fd=parent, follow_symlinks=False)


# --- whole trees --------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One name met by `walk`: `parent` is a descriptor of its directory, valid only
    until the walk goes on."""

    parent: int
    name: str
    stat: os.stat_result
    path: str  # relative to the walk's root

    @contextlib.contextmanager
    def opened(self) -> Iterator[str]:
        """A path to exactly this inode (not a link: links are not opened), for calls
        that take no descriptor (xattrs, chmod)."""
        fd = os.open(self.name, _PATH_FLAGS, dir_fd=self.parent)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (self.stat.st_dev, self.stat.st_ino):
                raise OperationError(f"{self.name!r} changed while it was looked at")
            yield _proc(fd)
        finally:
            os.close(fd)


def walk(root: Path, *, deadline: float | None = None) -> Iterator[Entry]:
    """Every name under `root`, parents before their children, never through a link or
    into another file system. One directory is open at a time, whatever the depth.
    With `deadline` (time.monotonic()), gives up with TimeoutError when it passes."""
    fd = os.open(root, _DIR_FLAGS)
    top = os.fstat(fd)
    # Per level: the directory's (dev, ino), and the names of it still to visit.
    trail: list[tuple[tuple[int, int], list[str]]] = [
        ((top.st_dev, top.st_ino), sorted(os.listdir(fd), reverse=True))
    ]
    names: list[str] = []  # the path from the root to the directory open now
    try:
        while trail:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"walking {root} took too long")
            pending = trail[-1][1]
            if not pending:
                trail.pop()
                if names:
                    names.pop()
                if trail:  # back up to the parent: it must be the one we came from
                    up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = up
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) != trail[-1][0]:
                        raise OperationError(f"a directory under {root} moved during a walk")
                continue
            name = pending.pop()
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone meanwhile (a running guest)
            yield Entry(fd, name, st, "/".join((*names, name)))
            if stat.S_ISDIR(st.st_mode) and st.st_dev == top.st_dev:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                here = os.fstat(child)
                if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
                    os.close(child)
                    continue  # swapped meanwhile: not what was looked at
                os.close(fd)
                fd = child
                names.append(name)
                trail.append(((st.st_dev, st.st_ino), sorted(os.listdir(fd), reverse=True)))
    finally:
        os.close(fd)


def disk_usage(root: Path, *, seconds: float | None = None) -> int:
    """Bytes of disk a tree really takes (allocated blocks, hard links counted once).
    With `seconds`, TimeoutError once counting takes longer (a guest can make millions
    of files)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    deadline = None if seconds is None else time.monotonic() + seconds
    for entry in walk(root, deadline=deadline):
        st = entry.stat
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total


def remove_tree(path: Path) -> None:
    """Rename first, then delete: an interrupted delete leaves a hidden leftover, never
    a half-deleted tree under its real name. rm(1) goes to any depth, never follows a
    link and stays on this file system (a bind a guest left mounted is not emptied)."""
    if not os.path.lexists(path):
        return
    doomed = path.with_name(f".{path.name}.removing-{os.getpid()}")
    os.rename(path, doomed)
    delete(doomed)


def delete(path: Path) -> None:
    """Delete a tree now (a hidden leftover, a staging directory)."""
    if os.path.lexists(path):
        run(["rm", "-rf", "--one-file-system", "--", path])


def copy_tree(source: Path, target: Path) -> None:
    """A copy of a guest's tree that keeps everything as it is: owners, modes, links as
    links, hard links, xattrs, ACLs; sparse files stay sparse (a 15 TiB hole is not
    read), a reflink where the file system has them."""
    run(["cp", "-a", "--reflink=auto", "--sparse=always", "--", source, target])
