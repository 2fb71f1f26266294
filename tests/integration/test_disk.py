"""A layer's own disk (disk.py) with real loop devices, ext4, resize2fs and e2fsck, under
a private directory of this machine: made and mounted, full at its size, grown while
mounted, shrunk while not, and taken away whole by the delete of its layer. The whole
container on such a disk (df in the guest, ENOSPC, set, a snapshot, a restart) is in
tests/vm/test_disk.py: a nested test host has no loop devices."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nspawnctl import disk
from nspawnctl.errors import OperationError
from nspawnctl.guesttree import remove_tree
from nspawnctl.mounts import is_mount_point

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/loop-control") or os.geteuid() != 0,
    reason="needs root and loop devices",
)

MIB = 1 << 20


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "web"
    path.mkdir()
    yield path
    if is_mount_point(disk.mount_point(path)):
        subprocess.run(["umount", disk.mount_point(path)], check=True)


def fill(where: Path) -> int:
    """Bytes written before the file system said it is full."""
    written = 0
    with open(where / "filler", "wb") as f:
        try:
            while True:
                written += f.write(b"x" * MIB)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return written


def test_a_disk_is_full_at_its_size_and_grows(layer: Path) -> None:
    disk.make(layer, 96 * MIB, None)
    assert disk.has_disk(layer) and is_mount_point(disk.mount_point(layer))
    use = disk.use(layer)
    assert use is not None and 80 * MIB < use.bytes_total <= 96 * MIB
    # Sparse: the image takes what was written, not its size.
    assert os.stat(disk.image_of(layer)).st_blocks * 512 < 16 * MIB
    written = fill(disk.mount_point(layer))
    assert 70 * MIB < written <= 96 * MIB
    if not disk.can_grow_live():
        # This machine's sandbox took CAP_SYS_RESOURCE even from root: refused, whole.
        with pytest.raises(OperationError, match="needs CAP_SYS_RESOURCE"):
            disk.resize(layer, 160 * MIB, running=True)
        assert disk.size_of(layer) == 96 * MIB
    disk.resize(layer, 160 * MIB, running=disk.can_grow_live())
    grown = disk.use(layer)
    assert grown is not None and grown.bytes_total > 140 * MIB
    with open(disk.mount_point(layer) / "more", "wb") as f:
        f.write(b"y" * 32 * MIB)  # room again


def test_a_disk_shrinks_only_unmounted_and_only_if_the_files_fit(layer: Path) -> None:
    disk.make(layer, 160 * MIB, 5000)
    use = disk.use(layer)
    assert use is not None and 5000 <= use.inodes_total < 6000  # whole groups of inodes
    (disk.mount_point(layer) / "data").write_bytes(b"z" * 100 * MIB)
    with pytest.raises(OperationError, match="shrinks only unmounted"):
        disk.resize(layer, 96 * MIB, running=True)
    with pytest.raises(OperationError, match="too much for"):
        disk.resize(layer, 96 * MIB, running=False)
    (disk.mount_point(layer) / "data").unlink()
    disk.resize(layer, 96 * MIB, running=False)
    assert disk.size_of(layer) == 96 * MIB
    assert is_mount_point(disk.mount_point(layer))  # mounted again after the shrink
    shrunk = disk.use(layer)
    assert shrunk is not None and shrunk.bytes_total <= 96 * MIB


def test_deleting_a_layer_unmounts_its_disk_and_frees_the_loop_device(layer: Path) -> None:
    disk.make(layer, 64 * MIB, None)
    (disk.mount_point(layer) / "upper").mkdir()
    remove_tree(layer)
    assert not layer.exists()
    assert str(layer) not in Path("/proc/self/mountinfo").read_text()
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    assert layer.name not in losetup.stdout


def test_a_layer_renamed_keeps_its_disk_mounted(layer: Path) -> None:
    disk.make(layer, 64 * MIB, None)
    moved = layer.with_name("moved")
    layer.rename(moved)
    try:
        assert is_mount_point(disk.mount_point(moved))
        assert disk.use(moved) is not None
    finally:
        remove_tree(moved)
