"""The image store on real systemd: containers as copy-on-write layers over one shared
image, updated once for all, exported and imported, imported from a directory."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nspawnctl.errors import NspawnctlError
from nspawnctl.recipe import parse_image, with_bootstrap
from nspawnctl.store import ImageStore
from nspawnctl.userns import version_of
from tests.integration.conftest import (
    CLIENT_KEY,
    STATE_IN_HOST,
    booted_host,
    cached_image,
    nspawnctl,
    ssh,
)
from tests.testhost import TestHost

MB = 2**20


@pytest.fixture(scope="module")
def host(private_store: Path) -> Iterator[TestHost]:
    """These tests update and import images: a store of their own."""
    with booted_host(private_store) as h:
        yield h


def layer_bytes(host: TestHost, name: str) -> int:
    out = host.run(["du", "-s", "--block-size=1", f"{STATE_IN_HOST}/layers/{name}"]).stdout
    return int(out.split()[0])


def add(host: TestHost, name: str, port: int, *extra: str) -> None:
    nspawnctl(host, "add", name, "--ssh", str(port), "--key", f"{CLIENT_KEY}.pub", *extra)


def wait_stopped(host: TestHost, name: str) -> None:
    host.wait_for(
        lambda: (
            host.run(
                ["systemctl", "is-active", f"systemd-nspawn@{name}.service"], check=False
            ).stdout.strip()
            == "inactive"
        ),
        timeout=60,
        what=f"{name} stopped",
    )


NAMES = [f"c{i}" for i in range(1, 7)]


def test_six_containers_share_one_image(host: TestHost) -> None:
    for index, name in enumerate(NAMES):
        add(host, name, 2400 + index)
    for index, name in enumerate(NAMES):
        assert ssh(host, 2400 + index, "hostname").stdout.strip() == name
    sizes = {name: layer_bytes(host, name) for name in NAMES}
    print(
        "layer sizes after first boot and an SSH login:",
        {n: f"{b / MB:.2f} MB" for n, b in sizes.items()},
    )
    assert max(sizes.values()) <= 30 * MB
    # One image on disk for all six: every root is an overlay over the same version, each
    # through an ID-mapped bind of its own uid range (user namespaces).
    lowers = set()
    for name in NAMES:
        mount = host.run(["findmnt", "-n", "-o", "OPTIONS", f"/var/lib/machines/{name}"]).stdout
        lowers.add(Path(re.search(r"lowerdir=([^,]+)", mount).group(1)))  # type: ignore[union-attr]
    assert len(lowers) == len(NAMES)
    assert len({version_of(lower) for lower in lowers}) == 1
    image_list = nspawnctl(host, "image", "list").stdout
    assert ",".join(NAMES) in image_list
    status = nspawnctl(host, "status", "c1").stdout
    assert re.search(r"layer:\s+\d", status), status


def test_update_once_for_all(host: TestHost) -> None:
    # c2 has its own /etc/marker: its copy must win, and the update must say so.
    ssh(host, 2401, "echo mine > /etc/marker")
    result = nspawnctl(
        host, "image", "update", "debian:bookworm", "--", "sh", "-c", "echo v2 > /etc/marker"
    )
    assert "c1" in result.stderr and "old version until restarted" in result.stderr
    assert re.search(r"c2 has its own copy of 1 file.*/etc/marker", result.stderr)
    # Running containers keep their version until they restart.
    assert (
        ssh(host, 2400, "cat /etc/marker 2>&1 || true")
        .stdout.strip()
        .endswith("No such file or directory")
    )
    nspawnctl(host, "restart", "c1")
    assert ssh(host, 2400, "cat /etc/marker").stdout.strip() == "v2"
    nspawnctl(host, "stop", "c3")
    wait_stopped(host, "c3")
    assert ssh(host, 2402, "cat /etc/marker").stdout.strip() == "v2"
    nspawnctl(host, "restart", "c2")
    assert ssh(host, 2401, "cat /etc/marker").stdout.strip() == "mine"
    # v1 goes once nothing runs on it any more and no snapshot names it: this update's
    # pre-update-v3 snapshots replace those of the first one, and keep v2 instead.
    for name in NAMES:
        nspawnctl(host, "stop", name)
    host.wait_for(
        lambda: (
            "/var/lib/machines/c" not in host.run(["findmnt", "-t", "overlay"], check=False).stdout
        ),
        timeout=60,
        what="every container's root unmounted",
    )
    nspawnctl(host, "image", "update", "debian:bookworm", "--", "true")
    versions = host.run(["sh", "-c", f"ls -d {STATE_IN_HOST}/images/*/v*"]).stdout.split()
    assert [Path(v).name for v in versions] == ["v2", "v3"]


def test_image_remove_is_refused_while_used(host: TestHost) -> None:
    result = nspawnctl(host, "image", "remove", "debian:bookworm", check=False)
    assert result.returncode == 2
    assert "used by: " + ", ".join(NAMES) in result.stderr


def test_export_and_import_under_another_name(host: TestHost) -> None:
    nspawnctl(host, "image", "export", "debian:bookworm", "/var/tmp/bookworm.tar.zst")
    host.run(["tar", "--zstd", "-tf", "/var/tmp/bookworm.tar.zst", "./etc/os-release"])
    nspawnctl(host, "image", "import", "/var/tmp/bookworm.tar.zst", "golden")
    add(host, "fromtar", 2410, "--image", "template:golden")
    assert ssh(host, 2410, "cat /etc/marker; hostname").stdout.split() == ["v2", "fromtar"]
    assert "template:golden" in nspawnctl(host, "image", "list").stdout


def test_directory_import_drops_device_nodes(host: TestHost) -> None:
    """A tree with device nodes (a copied /dev, a node hidden in /srv) becomes an image
    without them: a device node in a guest is a door to the host's devices."""
    image = f"{STATE_IN_HOST}/images/{cached_image().key}/current/"
    host.run(["cp", "-a", image, "/var/tmp/tree"])
    host.run(["mknod", "/var/tmp/tree/dev/sda", "b", "8", "0"])
    host.run(["mknod", "/var/tmp/tree/srv/mem", "c", "1", "1"])
    host.write_file("/var/tmp/tree/srv/data.txt", "kept\n")
    nspawnctl(host, "image", "import", "/var/tmp/tree", "p2v")
    add(host, "p2v", 2411, "--image", "template:p2v")
    out = ssh(host, 2411, "cat /srv/data.txt; ls /srv; test -e /dev/sda && echo sda; true")
    assert out.stdout.split() == ["kept", "data.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["image", "import", "/nonexistent.tar", "x1"], "no such file"),
        (["image", "import", "/etc/hostname", "x2"], "not a tar archive"),
        (["image", "build", "template:x3"], "no image template:x3"),
        (["image", "remove", "debian:sid"], "no image"),
    ],
)
def test_bad_image_input_changes_nothing(host: TestHost, args: list[str], message: str) -> None:
    before = host.run(["ls", "-a", f"{STATE_IN_HOST}/images"]).stdout
    result = nspawnctl(host, *args, check=False)
    assert result.returncode in (1, 2) and message in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr
    assert host.run(["ls", "-a", f"{STATE_IN_HOST}/images"]).stdout == before


def test_tar_that_is_not_a_root_filesystem(host: TestHost) -> None:
    host.run(
        [
            "sh",
            "-c",
            "mkdir -p /var/tmp/notroot/etc && echo hi > /var/tmp/notroot/etc/x "
            "&& tar -C /var/tmp/notroot -czf /var/tmp/notroot.tar.gz .",
        ]
    )
    before = host.run(["ls", "-a", f"{STATE_IN_HOST}/images"]).stdout
    result = nspawnctl(host, "image", "import", "/var/tmp/notroot.tar.gz", "notroot", check=False)
    assert result.returncode == 1 and "not a root filesystem" in result.stderr
    assert host.run(["ls", "-a", f"{STATE_IN_HOST}/images"]).stdout == before


def test_unreachable_mirror_is_a_clear_error_and_changes_nothing(image_cache: Path) -> None:
    """debootstrap against a mirror nobody serves (a closed port on this machine)."""
    recipe = with_bootstrap(parse_image("debian:bookworm"), mirror="http://127.0.0.1:9/debian")
    with tempfile.TemporaryDirectory(prefix="nspawnctl-store-", dir="/var/tmp") as tmp:
        with pytest.raises(NspawnctlError) as info:
            ImageStore(Path(tmp)).ensure(recipe)
        assert "debootstrap" in info.value.message
        assert sorted(p.name for p in Path(tmp).iterdir()) == [".lock"]
