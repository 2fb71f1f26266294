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
without recursion or running out of descriptors. Trees at rest are copied, archived and
deleted by coreutils and tar, which keep sparse files sparse; the tree of a running
guest is copied by `copy_live`, on `walk`, since cp goes down by path names and a guest
that swaps a directory for a link meanwhile would have it copy the host's files.

Nothing else in nspawnctl opens a path under a layer, a snapshot's layer or an image
being imported (tests/unit/test_guesttree.py checks the imports)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nspawnctl.errors import OperationError
from nspawnctl.mounts import beneath
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


class _DirectoryMovedError(OperationError):
    """A directory that `walk` was in moved elsewhere meanwhile (a running guest)."""


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


def walk(root: Path, *, deadline: float | None = None) -> Generator[Entry, None, None]:
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
                        raise _DirectoryMovedError(f"a directory under {root} moved during a walk")
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
    """Delete a tree now (a hidden leftover, a staging directory). What nspawnctl mounted
    in it (a layer's own disk, disk.py) is unmounted first; rm stays on one file system
    and would leave it, and its mount point, behind."""
    if os.path.lexists(path):
        for point in beneath(path):
            run(["umount", point])
        run(["rm", "-rf", "--one-file-system", "--", path])


def copy_tree(source: Path, target: Path) -> None:
    """A copy of a guest's tree that keeps everything as it is: owners, modes, links as
    links, hard links, xattrs, ACLs; sparse files stay sparse (a 15 TiB hole is not
    read), a reflink where the file system has them."""
    run(["cp", "-a", "--reflink=auto", "--sparse=always", "--", source, target])


# --- a copy of a running guest's tree -----------------------------------------------

# A live copy that a directory moved under (walk cannot tell where its contents went)
# starts again from scratch this many times in all, then gives up. A guest that renames
# a directory now and then (a package manager, an atomic swap of a data directory)
# still gets its snapshot at the next attempt; one that renames in a loop only makes
# its own snapshot fail, after at most this many copies (and within the deadline).
LIVE_COPY_ATTEMPTS = 3

_COPY_CHUNK = 64 << 20  # bytes per copy_file_range: the deadline is looked at between


def copy_live(source: Path, target: Path, *, deadline: float | None = None) -> None:
    """Copy the tree at `source` (a running guest's, which may change meanwhile) to
    `target`, which must not exist: file types, owners, modes, times, xattrs (overlayfs'
    trusted.overlay.*, capabilities, ACLs) and hard links as they are, sparse files
    sparse. It goes down and up with `walk` and never through a link, so the copy holds
    nothing but inodes that were under `source`, at any depth. A file changed during
    the copy is copied as it was when it was read; one that vanished is left out. With
    `deadline` (time.monotonic()), gives up with TimeoutError. Nothing is left at
    `target` when it fails."""
    for _attempt in range(LIVE_COPY_ATTEMPTS):
        os.mkdir(target, 0o700)  # root's until it is whole; never into something there
        try:
            _copy_once(source, target, deadline)
            return
        except _DirectoryMovedError:
            delete(target)
        except BaseException:
            delete(target)
            raise
    raise OperationError(
        f"the container changed its files too fast to be copied while it runs "
        f"(a directory of {source} moved during each of {LIVE_COPY_ATTEMPTS} copies)",
        hint="stop it first, then copy it",
    )


def _copy_once(source: Path, target: Path, deadline: float | None) -> None:
    # Inodes with more than one name, copied already: their type and path in the copy.
    linked: dict[tuple[int, int], tuple[int, str]] = {}
    # The copy's directories being filled, the target itself first: name and stat of
    # the source's. Their modes and times are set once their contents are in (a 0555
    # directory could not be filled, and every entry made changes an mtime).
    filling: list[tuple[str, os.stat_result]] = []
    here = os.open(target.parent, _DIR_FLAGS)  # the copy's directory that `walk` is in

    def enter(name: str, st: os.stat_result) -> None:
        nonlocal here
        child = os.open(name, _DIR_FLAGS, dir_fd=here)
        os.close(here)
        here = child
        filling.append((name, st))

    def leave() -> None:
        # Up by "..": the copy is nspawnctl's own and out of the guest's reach.
        nonlocal here
        name, st = filling.pop()
        up = os.open("..", _DIR_FLAGS, dir_fd=here)
        os.close(here)
        here = up
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=here)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=here)

    try:
        root = os.open(source, _DIR_FLAGS)
        try:
            top = os.fstat(root)
            _adopt(root, top, here, target.name)
        finally:
            os.close(root)
        enter(target.name, top)
        with contextlib.closing(walk(source, deadline=deadline)) as entries:
            for entry in entries:
                depth = entry.path.count("/") + 1  # of the directory it is in
                if depth > len(filling):
                    continue  # in a directory that was replaced as it was looked at
                while len(filling) > depth:
                    leave()
                made = _copy_entry(entry, here, target, linked, deadline)
                if made is not None:
                    enter(entry.name, made)
        while filling:
            leave()
    finally:
        os.close(here)


def _copy_entry(
    entry: Entry,
    here: int,
    target: Path,
    linked: dict[tuple[int, int], tuple[int, str]],
    deadline: float | None,
) -> os.stat_result | None:
    """Make `entry` in the copy's directory `here`; for a directory, its stat (its mode
    and times are set once it is filled)."""
    kind = stat.S_IFMT(entry.stat.st_mode)
    key = (entry.stat.st_dev, entry.stat.st_ino)
    first = linked.get(key) if entry.stat.st_nlink > 1 else None
    if first is not None and first[0] == kind:  # (an inode number reused meanwhile: not)
        path = PurePosixPath(first[1])
        with GuestTree(target, "a copy").directory(path.parent) as fd:
            os.link(path.name, entry.name, src_dir_fd=fd, dst_dir_fd=here, follow_symlinks=False)
        return None
    # Everything is read through a descriptor of the very inode `walk` looked at: the
    # name may be another file, a link or a FIFO by now.
    try:
        pinned = os.open(entry.name, _PATH_FLAGS, dir_fd=entry.parent)
    except FileNotFoundError:
        return None  # gone meanwhile
    try:
        st = os.fstat(pinned)
        if (st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)) != (*key, kind):
            return None  # replaced meanwhile: left out, as if it had gone
        if kind == stat.S_IFDIR:
            os.mkdir(entry.name, 0o700, dir_fd=here)
        elif kind == stat.S_IFREG:
            # Reopened through the pinned inode, known to be a regular file (O_NOFOLLOW
            # cannot go with /proc's magic link, and is not needed: no name is looked up
            # again, and the name could be a FIFO by now). O_NONBLOCK: a lease that the
            # guest holds on it makes the open fail instead of waiting for the guest.
            data = os.open(_proc(pinned), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                st = os.fstat(data)
                copy = os.open(
                    entry.name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=here,
                )
                try:
                    _copy_data(data, copy, st.st_size, deadline)
                finally:
                    os.close(copy)
            finally:
                os.close(data)
        elif kind == stat.S_IFLNK:
            os.symlink(os.readlink("", dir_fd=pinned), entry.name, dir_fd=here)
        else:  # FIFO, socket, device; a character device 0:0 is an overlayfs whiteout
            os.mknod(entry.name, kind | 0o600, st.st_rdev, dir_fd=here)
        _adopt(pinned, st, here, entry.name)
    finally:
        os.close(pinned)
    if kind == stat.S_IFDIR:
        return st
    if kind != stat.S_IFLNK:  # a link's mode means nothing and cannot be set
        os.chmod(entry.name, stat.S_IMODE(st.st_mode), dir_fd=here)
    os.utime(entry.name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=here, follow_symlinks=False)
    if st.st_nlink > 1:
        linked[key] = (kind, entry.path)
    return None


def _adopt(source: int, st: os.stat_result, here: int, name: str) -> None:
    """Give the copy `name` in `here` the owner and xattrs of inode `source` (a
    descriptor). Before its mode: chown clears set-uid bits and capabilities."""
    os.chown(name, st.st_uid, st.st_gid, dir_fd=here, follow_symlinks=False)
    made = os.open(name, _PATH_FLAGS, dir_fd=here)
    try:
        # Through /proc: the xattr calls take no O_PATH descriptor, and a link's own
        # xattrs are reached so, not its target's.
        wanted = os.listxattr(_proc(source))
        for key in wanted:
            try:
                value = os.getxattr(_proc(source), key)
            except OSError as err:
                if err.errno != errno.ENODATA:
                    raise
                continue  # removed meanwhile
            os.setxattr(_proc(made), key, value)
        # An ACL the copy inherited from its directory's default ACL is not the source's.
        for key in set(os.listxattr(_proc(made))) - set(wanted):
            os.removexattr(_proc(made), key)
    finally:
        os.close(made)


def _copy_data(source: int, target: int, size: int, deadline: float | None) -> None:
    """The first `size` bytes of `source` into `target`, holes left holes: only the data
    ranges (SEEK_DATA/SEEK_HOLE) are copied, so a 15 TiB sparse file costs what its data
    costs. What a guest appends meanwhile is left out; what it cuts off is a hole."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(source, offset, os.SEEK_DATA)
            end = min(os.lseek(source, start, os.SEEK_HOLE), size)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            break  # nothing but a hole from offset on
        while start < end:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("copying a guest's file took too long")
            copied = _copy_range(source, target, start, min(end - start, _COPY_CHUNK))
            if not copied:
                break  # cut shorter meanwhile
            start += copied
        offset = end
    os.ftruncate(target, size)


def _copy_range(source: int, target: int, offset: int, count: int) -> int:
    """Bytes copied at `offset`: in the kernel (a reflink on Btrfs or XFS), else by
    reading and writing (another file system, an old kernel)."""
    try:
        return os.copy_file_range(source, target, count, offset, offset)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(source, min(count, 1 << 20), offset)
    written = 0
    while written < len(data):
        written += os.pwrite(target, data[written:], offset + written)
    return len(data)
