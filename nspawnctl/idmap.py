"""ID-mapped bind mounts: mount_setattr(2) with MOUNT_ATTR_IDMAP, which util-linux 2.38's
mount(8) cannot ask for (X-mount.idmap came with 2.39).

Only the standard library, on purpose: a container's lower unit runs this file as
`python3 -I -S .../idmap.py SOURCE TARGET BASE` on the first start of the container after
a host boot or an image update, and that way Python starts in about 25 ms instead of the
100 ms it takes with site-packages. For the same reason errors are OSError here:
nspawnctl.userns turns them into nspawnctl's own errors when it calls in."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
from pathlib import Path

# Syscalls from 424 on have one number on every architecture but alpha.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_IDMAP = 0x100000
_CLONE_NEWUSER = 0x10000000
RANGE = 0x10000  # ids mapped: a whole 16-bit uid space, as systemd-nspawn gives a guest

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def idmapped_mount(
    source: Path, target: Path, *, inside: int, outside: int, read_only: bool = True
) -> None:
    """Bind `source` on `target` so that a file owned by uid (and gid) `inside`+N on disk
    is seen as owned by `outside`+N, for N below RANGE; other owners show as the overflow
    uid. Nothing on disk changes. `target` must exist."""
    tree = _syscall(
        "open_tree",
        source,
        _SYS_OPEN_TREE,
        _AT_FDCWD,
        bytes(source),
        _OPEN_TREE_CLONE | os.O_CLOEXEC,
    )
    try:
        userns = _user_namespace(f"{inside} {outside} {RANGE}\n")
        try:
            flags = _MOUNT_ATTR_IDMAP | (_MOUNT_ATTR_RDONLY if read_only else 0)
            # struct mount_attr: attr_set, attr_clr, propagation, userns_fd (all u64).
            attr = ctypes.create_string_buffer(struct.pack("=QQQQ", flags, 0, 0, userns))
            _syscall(
                "mount_setattr",
                source,
                _SYS_MOUNT_SETATTR,
                tree,
                b"",
                _AT_EMPTY_PATH,
                attr,
                len(attr.raw),
            )
        finally:
            os.close(userns)
        _syscall(
            "move_mount",
            target,
            _SYS_MOVE_MOUNT,
            tree,
            b"",
            _AT_FDCWD,
            bytes(target),
            _MOVE_MOUNT_F_EMPTY_PATH,
        )
    finally:
        os.close(tree)


def _syscall(
    name: str, path: Path, number: int, *args: int | bytes | ctypes.Array[ctypes.c_char]
) -> int:
    # syscall(2) is variadic and reads every argument as a long: widen the integers.
    wide = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(_libc.syscall(ctypes.c_long(number), *wide))
    if result < 0:
        code = ctypes.get_errno()
        why = os.strerror(code)
        if name == "mount_setattr" and code == errno.EINVAL:
            why += " (its file system cannot make ID-mapped mounts)"
        raise OSError(code, f"{name} {path}: {why}")
    return result


def _user_namespace(id_map: str) -> int:
    """A file descriptor of a new user namespace whose uid and gid maps are `id_map`. A
    forked child makes it and waits while this process, root outside, writes the maps:
    a namespace cannot map ids of the outside it has no right to itself."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: unshare, say so, wait to be told to go
        try:
            os.close(ready_r)
            os.close(done_w)
            if _libc.unshare(ctypes.c_int(_CLONE_NEWUSER)) == 0:
                os.write(ready_w, b"1")
                os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "unshare(CLONE_NEWUSER): no user namespace was made")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as map_file:
                map_file.write(id_map)  # one write(2), as the kernel wants it
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def main(argv: list[str]) -> int:
    """SOURCE TARGET BASE: bind SOURCE (an image version) on TARGET, read-only, with disk
    uid N seen as BASE+N; TARGET is made if missing."""
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: idmap.py SOURCE TARGET BASE", file=sys.stderr)
        return 2
    source, target, base = Path(argv[0]), Path(argv[1]), int(argv[2])
    try:
        # 0700, each directory made: below is every image, seen with container uids.
        for directory in (*reversed(target.parents), target):
            if not directory.exists():
                directory.mkdir(mode=0o700, exist_ok=True)  # another container's too
        idmapped_mount(source, target, inside=0, outside=base)
    except OSError as err:
        print(f"nspawnctl idmap: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
