"""User namespaces: a container's uid 0 is an unprivileged uid of the host.

Each container gets a base B at `add`: a multiple of 65536 in systemd's range for
containers, its own on this host. Guest uid N is host uid B+N. B is kept with the
container as the owner of its layer's upper directory, which is the container's root
directory, where systemd-nspawn itself looks for it (PrivateUsers=pick).

The image stays owned by 0 on disk and shared by every container: each one mounts it
through an ID-mapped bind (disk uid N seen as B+N) made by its lower unit with
nspawnctl/idmap.py. That bind lives at IDMAP_ROOT/B/<the image version's path>, so an
overlay's lowerdir= still says which image version a container runs on, and a new image
version gets a bind of its own. The overlay itself is mounted by host root as before;
its copy-ups then land in the upper directory owned by B+N, and nothing is chowned."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nspawnctl import idmap
from nspawnctl.errors import OperationError
from nspawnctl.guesttree import walk
from nspawnctl.mounts import mounts
from nspawnctl.run import run

RANGE = idmap.RANGE
# systemd's CONTAINER_UID_BASE_MIN/MAX: the range nspawn's PrivateUsers=pick draws from
# and that machined names (vu-NAME-N) in `ps` and `ls` on the host.
BASE_MIN, BASE_MAX = 0x00080000, 0x6FFF0000
IDMAP_ROOT = Path("/run/nspawnctl/idmap")
IDMAP_SCRIPT = Path(idmap.__file__).resolve()


def lower_path(version: Path, base: int) -> Path:
    """Where a container with uid base `base` sees image version `version` (0: as is)."""
    return IDMAP_ROOT / str(base) / version.relative_to("/") if base else version


def version_of(lower: Path) -> Path:
    """The image version behind an overlay's lower directory (lower_path undone)."""
    parts = lower.parts
    root = IDMAP_ROOT.parts
    if parts[: len(root)] == root and len(parts) > len(root) + 1 and parts[len(root)].isdigit():
        return Path("/", *parts[len(root) + 1 :])
    return lower


@dataclass(frozen=True)
class IdmappedLower:
    where: Path
    base: int
    version: Path


def idmapped_lowers() -> list[IdmappedLower]:
    """The ID-mapped image binds of this mount namespace (see lower_path)."""
    found = []
    for mount in mounts():
        where = mount.where
        version = version_of(where)
        if version != where:
            found.append(IdmappedLower(where, int(where.parts[len(IDMAP_ROOT.parts)]), version))
    return found


def unmount(lowers: list[IdmappedLower]) -> None:
    """Unmount binds no overlay needs any more (an overlay keeps a private clone of its
    lower mounts, so even a running container would not lose its image)."""
    for lower in lowers:
        run(["umount", lower.where])
        # The directories lower_path made, up to the base's own.
        with contextlib.suppress(OSError):
            for directory in (lower.where, *lower.where.parents):
                if directory == IDMAP_ROOT:
                    break
                directory.rmdir()


def base_of(upper: Path) -> int:
    """The uid base of a layer: the owner of its upper directory (0: no user namespace)."""
    return os.stat(upper).st_uid // RANGE * RANGE


def allocate(name: str, used: set[int]) -> int:
    """A free uid base for container `name`: the same one for the same name as long as it
    is free (so `render` shows what `add` writes), the next free one otherwise."""
    slots = (BASE_MAX - BASE_MIN) // RANGE
    first = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % slots
    for step in range(slots):
        base = BASE_MIN + (first + step) % slots * RANGE
        if base not in used:
            return base
    raise OperationError("every uid range for containers is in use")  # 28,000 of them


@contextlib.contextmanager
def allocation_lock(layers_dir: Path) -> Iterator[None]:
    """One `add` at a time between checking a base is free and taking it."""
    layers_dir.mkdir(parents=True, exist_ok=True)
    with open(layers_dir / ".uid-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def check_idmap_support(version: Path) -> None:
    """Refuse, before anything is written, an image store on a file system that cannot
    make ID-mapped mounts (overlayfs, NFS; ext4, XFS, Btrfs and tmpfs can)."""
    with tempfile.TemporaryDirectory(prefix="nspawnctl-idmap-") as probe:
        try:
            idmap.idmapped_mount(version, Path(probe), inside=0, outside=BASE_MIN)
        except OSError as err:
            raise OperationError(
                f"cannot give {version} to a container with a user namespace: {err.strerror}",
                hint="put the image store (NSPAWNCTL_STATE_DIR) on ext4, XFS or Btrfs, "
                "or set `security: {user_namespace: false}`",
            ) from None
        run(["umount", probe])


@contextlib.contextmanager
def guest_view(tree: Path, base: int) -> Iterator[Path]:
    """`tree`, a layer's files in uid range `base` on disk, read-only and with the owners
    its guest sees (uid base+N shown as N); `tree` itself when `base` is 0."""
    if not base:
        yield tree
        return
    with tempfile.TemporaryDirectory(prefix="nspawnctl-guest-view-") as view:
        try:
            idmap.idmapped_mount(tree, Path(view), inside=base, outside=0)
        except OSError as err:
            raise OperationError(f"cannot show {tree} with its guest's owners: {err}") from None
        try:
            yield Path(view)
        finally:
            run(["umount", view])


# --- moving a tree from one uid range to another ----------------------------------

_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_USER, _ACL_GROUP = 0x02, 0x08  # the entry tags that carry an id
_CAPS = "security.capability"
_CAPS_V3 = 0x03000000  # a namespaced file capability: it names the uid of its root


def shift_ownership(tree: Path, old: int, new: int) -> None:
    """Move every file of `tree` from uid/gid range `old` to range `new` (old+N becomes
    new+N), with its ACL entries and the root uid of namespaced file capabilities.
    chown(2) clears set-uid/set-gid bits and file capabilities: both are put back. Ids
    outside the old range are not the container's and stay as they are."""
    if old == new:
        return

    def shift(value: int) -> int:
        return value - old + new if old <= value < old + RANGE else value

    # The tree is the guest's: walked without following a link, to any depth, and
    # each file changed through a descriptor of exactly the inode looked at.
    top = os.stat(tree)
    os.chown(tree, shift(top.st_uid), shift(top.st_gid))
    for entry in walk(tree):
        st = entry.stat
        if stat.S_ISLNK(st.st_mode):
            os.chown(
                entry.name,
                shift(st.st_uid),
                shift(st.st_gid),
                dir_fd=entry.parent,
                follow_symlinks=False,
            )
            continue
        with entry.opened() as path:
            _shift_one(path, st, shift)


def _shift_one(path: str, st: os.stat_result, shift: Callable[[int], int]) -> None:
    caps = _get_xattr(path, _CAPS)
    os.chown(path, shift(st.st_uid), shift(st.st_gid))
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    if caps is not None:
        os.setxattr(path, _CAPS, _shift_caps(caps, shift))
    for name in _ACLS:
        acl = _get_xattr(path, name)
        if acl is not None:
            os.setxattr(path, name, _shift_acl(acl, shift))


def _get_xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name)  # a /proc/self/fd path: exactly that inode
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _shift_acl(acl: bytes, shift: Callable[[int], int]) -> bytes:
    # A 4-byte version header, then entries of (u16 tag, u16 perm, u32 id), little-endian.
    out = bytearray(acl)
    for offset in range(4, len(acl) - 7, 8):
        tag, _perm, ident = struct.unpack_from("<HHI", acl, offset)
        if tag in (_ACL_USER, _ACL_GROUP):
            struct.pack_into("<I", out, offset + 4, shift(ident))
    return bytes(out)


def _shift_caps(caps: bytes, shift: Callable[[int], int]) -> bytes:
    # struct vfs_ns_cap_data: magic, two (permitted, inheritable) pairs, then rootid (v3).
    magic = struct.unpack_from("<I", caps)[0]
    if magic & 0xFF000000 != _CAPS_V3 or len(caps) < 24:
        return caps
    return caps[:20] + struct.pack("<I", shift(struct.unpack_from("<I", caps, 20)[0]))
