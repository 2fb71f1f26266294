"""A container's own disk (`resources.disk`): an ext4 file system in a sparse image file,
loop-mounted where its layer's upper and work directories live, so that the container
can fill its own disk and nothing else.

    layers/NAME/disk.ext4    the image, beside the layer's host files (root's only)
    layers/NAME/disk/        its mount point, holding upper/ and work/

Why an image and not quotas: project quotas need a file system made or converted for
them (ext4 `-O project,quota` while unmounted, or XFS with prjquota) and a kernel built
with CONFIG_QUOTA (the development VM's is not); btrfs qgroups need btrfs. A loop-mounted
image needs neither: it works on any host, and the guest's `df /` shows its size, since
overlayfs reports the file system of its upper directory. Writing past it is ENOSPC in
the guest alone. Sparse: it takes on the host what the guest wrote, up to its size.

The guest writes files in it, through the kernel; it cannot write the image's blocks,
so the file system's metadata is the kernel's, and e2fsck and resize2fs may read it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.errors import OperationError
from nspawnctl.run import run

IMAGE = "disk.ext4"
MOUNT_POINT = "disk"
_BYTES_PER_INODE = 16384  # mke2fs's default for file systems of this size
_CAP_SYS_RESOURCE = 24


def image_of(layer_dir: Path) -> Path:
    return layer_dir / IMAGE


def mount_point(layer_dir: Path) -> Path:
    return layer_dir / MOUNT_POINT


def has_disk(layer_dir: Path) -> bool:
    try:
        return os.lstat(image_of(layer_dir)).st_size > 0
    except OSError:
        return False


def _mounted(where: Path) -> bool:
    """Whether the disk is mounted at `where`: a file system of another device than its
    layer's. A stat, not a read of the whole mount table: `metrics` asks it of every
    container with a disk."""
    return os.path.ismount(where)


def make(layer_dir: Path, size: int, inodes: int | None) -> None:
    """A new, empty disk for a layer being built, mounted. The layer's directory is the
    new one's (a staging directory): renaming it later moves the mount with it."""
    image, where = image_of(layer_dir), mount_point(layer_dir)
    with open(image, "xb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.truncate(size)
    # -m 0: no blocks kept for root (the guest's root is the only user); -b 4096 and an
    # inode count of its own: mke2fs would otherwise pick 1 KiB blocks for a small one.
    count = inodes or max(size // _BYTES_PER_INODE, 1024)
    run(["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", "-N", str(count), str(image)])
    where.mkdir(mode=0o700, exist_ok=True)
    attach(layer_dir)


def attach(layer_dir: Path) -> None:
    """Mount the layer's disk if it is not (after the host booted, before any of its
    units did). A loop device comes and goes with the mount (autoclear)."""
    where = mount_point(layer_dir)
    if not _mounted(where):
        run(["mount", "-t", "ext4", "-o", "loop,discard", str(image_of(layer_dir)), str(where)])


@dataclass(frozen=True)
class Use:
    bytes_used: int
    bytes_total: int
    inodes_used: int
    inodes_total: int


def use(layer_dir: Path) -> Use | None:
    """What the guest sees with `df` and `df -i`; None without a mounted disk."""
    where = mount_point(layer_dir)
    if not has_disk(layer_dir) or not _mounted(where):
        return None
    st = os.statvfs(where)
    return Use(
        (st.f_blocks - st.f_bfree) * st.f_frsize,
        st.f_blocks * st.f_frsize,
        st.f_files - st.f_ffree,
        st.f_files,
    )


def _loop_device(layer_dir: Path) -> str:
    out = run(["losetup", "--noheadings", "-O", "NAME", "-j", str(image_of(layer_dir))]).stdout
    devices = out.split()
    if len(devices) != 1:
        raise OperationError(
            f"{image_of(layer_dir)}: expected one loop device, found {len(devices)}",
            hint="see `losetup -a`",
        )
    return devices[0]


def size_of(layer_dir: Path) -> int:
    return os.stat(image_of(layer_dir)).st_size


def resize(layer_dir: Path, size: int, *, running: bool) -> None:
    """Give the disk its new size. Grown live where the kernel lets nspawnctl (a mounted
    ext4 grows; the ioctl needs CAP_SYS_RESOURCE); otherwise only while nothing uses it,
    as a shrink always is (ext4 shrinks unmounted), and a shrink only if what the guest
    wrote fits. Refused with a hint, before anything changes, where it cannot be done."""
    now = size_of(layer_dir)
    if size == now:
        return
    if size > now and can_grow_live():
        image = image_of(layer_dir)
        os.truncate(image, size)
        device = _loop_device(layer_dir)
        run(["losetup", "-c", device])  # the loop device takes the file's new size
        run(["resize2fs", device])
        return
    if running:
        why = (
            "ext4 shrinks only unmounted"
            if size < now
            else "growing a mounted ext4 needs CAP_SYS_RESOURCE, which nspawnctl lacks here"
        )
        raise OperationError(
            f"resources.disk: {_mib(now)} -> {_mib(size)}: {why}",
            hint="stop the container, then run the command again",
        )
    current = use(layer_dir)
    if size < now and current is not None and current.bytes_used > size * 9 // 10:
        raise OperationError(
            f"resources.disk: the guest has written {_mib(current.bytes_used)}, "
            f"too much for {_mib(size)}",
            hint="delete files in the guest first, or give it more",
        )
    _resize_unmounted(layer_dir, size, grow=size > now)


def _resize_unmounted(layer_dir: Path, size: int, *, grow: bool) -> None:
    image = image_of(layer_dir)
    where = mount_point(layer_dir)
    if _mounted(where):
        run(["umount", str(where)])
    try:
        # 0: clean; 1: errors it corrected (ext4's journal was replayed, say).
        check = run(["e2fsck", "-f", "-p", str(image)], check=False)
        if check.returncode not in (0, 1):
            raise OperationError(
                f"{image}: e2fsck found errors it could not correct ({check.returncode})",
                hint=f"run `e2fsck -f {image}` by hand; the disk is left unmounted",
            )
        if grow:
            os.truncate(image, size)
        run(["resize2fs", str(image), f"{size // 1024}K"])
        if not grow:
            os.truncate(image, size)
    finally:
        attach(layer_dir)


def can_grow_live() -> bool:
    """Whether this process has CAP_SYS_RESOURCE, which ext4's online resize asks for
    (a sandbox, as the development VM's, may have taken it away even from root)."""
    with open("/proc/self/status", encoding="ascii") as f:
        effective = next(line for line in f if line.startswith("CapEff:")).split()[1]
    return bool(int(effective, 16) >> _CAP_SYS_RESOURCE & 1)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"
