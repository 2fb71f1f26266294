"""uid ranges of containers: choosing one, naming the ID-mapped view of an image version,
moving a layer from one range to another (with what chown(2) would lose)."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from nspawnctl.layers import Layer, reown_layer, used_uid_bases
from nspawnctl.userns import BASE_MAX, BASE_MIN, RANGE, allocate, lower_path, version_of

B1, B2 = 0x00AB0000, 0x00CD0000
VERSION = Path("/var/lib/nspawnctl/images/debian-x/v3")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def test_a_version_and_its_idmapped_view_name_each_other() -> None:
    view = lower_path(VERSION, B1)
    assert view == Path(f"/run/nspawnctl/idmap/{B1}/var/lib/nspawnctl/images/debian-x/v3")
    assert version_of(view) == VERSION
    # Without a user namespace the overlay sits on the version itself.
    assert lower_path(VERSION, 0) == VERSION
    assert version_of(VERSION) == VERSION


def test_allocation_is_stable_per_name_and_avoids_used_ranges() -> None:
    base = allocate("web", set())
    assert base == allocate("web", set())  # `render` shows what `add` will take
    assert BASE_MIN <= base < BASE_MAX and base % RANGE == 0
    assert allocate("web", {base}) != base
    # Different names spread over the range instead of queueing at its start.
    assert len({allocate(f"c{i}", set()) for i in range(50)}) > 45


@needs_root
def test_used_ranges_are_read_from_the_layers(tmp_path: Path) -> None:
    for name, base in (("a", B1), ("b", B2), ("c", 0)):
        (tmp_path / name / "upper").mkdir(parents=True)
        os.chown(tmp_path / name / "upper", base, base)
    assert used_uid_bases(tmp_path, but={"a"}) == {B2, 0}


@needs_root
def test_reown_moves_owners_and_keeps_setuid_caps_and_acls(tmp_path: Path) -> None:
    layer = Layer(tmp_path / "layer")
    upper = layer.upper
    (upper / "usr/bin").mkdir(parents=True)
    tool = upper / "usr/bin/tool"
    tool.write_text("#!/bin/sh\n")
    os.symlink("tool", upper / "usr/bin/link")
    # A namespaced file capability (v3): cap_net_raw, for the root of range B1.
    caps = struct.pack("<IIIIII", 0x03000000, 1 << 13, 0, 0, 0, B1)
    # An ACL granting the guest's uid 1000 (B1+1000 on disk) read access.
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident)
        for tag, perm, ident in (
            (0x01, 7, 0xFFFFFFFF),
            (0x02, 4, B1 + 1000),
            (0x04, 5, 0xFFFFFFFF),
            (0x10, 5, 0xFFFFFFFF),
            (0x20, 5, 0xFFFFFFFF),
        )
    )
    for path in (upper, upper / "usr", upper / "usr/bin", tool):
        os.chown(path, B1, B1)
    os.lchown(upper / "usr/bin/link", B1 + 5, B1 + 5)
    # In this order: a chown clears set-uid and capabilities, an ACL sets mode bits.
    os.setxattr(tool, "system.posix_acl_access", acl)
    os.chmod(tool, 0o4755)
    os.setxattr(tool, "security.capability", caps)
    foreign = upper / "hosts"  # not of the container's range: left alone
    foreign.write_text("")

    reown_layer(layer, B2)

    assert layer.uid_base == B2
    assert (os.stat(tool).st_uid, os.stat(tool).st_gid) == (B2, B2)
    assert os.lstat(upper / "usr/bin/link").st_uid == B2 + 5
    assert stat.S_IMODE(os.stat(tool).st_mode) == 0o4755  # chown cleared it; put back
    moved = os.getxattr(tool, "security.capability")
    assert struct.unpack_from("<I", moved, 20)[0] == B2
    assert struct.unpack_from("<I", moved, 4)[0] == 1 << 13
    # The second entry (after the header and the owner's): the named user's.
    entries = os.getxattr(tool, "system.posix_acl_access")
    assert struct.unpack_from("<HHI", entries, 12) == (0x02, 4, B2 + 1000)
    assert os.stat(foreign).st_uid == 0

    reown_layer(layer, 0)  # and out of any range: a container without a user namespace
    assert layer.uid_base == 0 and os.stat(tool).st_uid == 0
