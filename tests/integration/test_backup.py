"""Backups on real systemd: export -> remove -> import gives the container back with its
data; snapshot -> change -> rollback gives the old files back; `image update` leaves a
snapshot that undoes it; bad archives and names are refused with nothing changed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import CLIENT_KEY, STATE_IN_HOST, booted_host, nspawnctl, ssh
from tests.testhost import TestHost

BOX, TICK = 2600, 2602  # the ports of the two containers of these tests
BINDS = 2603  # a container imported from a crafted archive
# Where every trace of an import, a snapshot or a rollback would be.
WATCHED = (
    "/etc/nspawnctl",
    "/etc/systemd/system",
    "/etc/systemd/nspawn",
    f"{STATE_IN_HOST}/layers",
    f"{STATE_IN_HOST}/snapshots",
    f"{STATE_IN_HOST}/images",
)


@pytest.fixture(scope="module")
def host(private_store: Path) -> Iterator[TestHost]:
    """`image update` changes the store: a store of their own."""
    with booted_host(private_store) as h:
        yield h


def add(host: TestHost, name: str, port: int, *extra: str) -> str:
    nspawnctl(host, "add", name, "--ssh", str(port), "--key", f"{CLIENT_KEY}.pub", *extra)
    return name


@pytest.fixture(scope="module")
def box(host: TestHost) -> str:
    return add(host, "box", BOX)


@pytest.fixture(scope="module")
def tick(host: TestHost) -> str:
    return add(host, "tick", TICK)


def stop(host: TestHost, name: str) -> None:
    """Powered off and its root unmounted: its layer is no longer in use."""
    nspawnctl(host, "stop", name)
    mount = f"var-lib-machines-{name}.mount"
    try:
        host.wait_for(
            lambda: host.run(["findmnt", f"/var/lib/machines/{name}"], check=False).returncode != 0,
            timeout=60,
            what=f"{name}'s root unmounted",
        )
    except TimeoutError as err:
        # Seen here: "Failed to attach to cgroup /system.slice/...mount: No such file or
        # directory", when another test host on this machine trimmed the shared cgroup v1
        # trees. Say so in the failure.
        status = host.run(["systemctl", "status", "--no-pager", "-n", "5", mount], check=False)
        raise TimeoutError(f"{err}\n{status.stdout}") from None


def state(host: TestHost) -> list[str]:
    """Every file (size, mtime) and directory where a backup command leaves traces,
    hidden staging directories included."""
    script = (
        'find "$@" -maxdepth 3 \\( -type f -printf "%p %s %T@\\n" \\) -o -printf "%p\\n" '
        "2>/dev/null | sort; ls -a " + STATE_IN_HOST
    )
    lines = host.run(["sh", "-c", script, "sh", *WATCHED], check=False).stdout.splitlines()
    # The image store's lock file is opened (its time touched) by every look-up.
    return [line for line in lines if "/images/.lock " not in line]


def snapshot_names(host: TestHost, name: str) -> list[str]:
    rows = nspawnctl(host, "snapshot", "--list", name).stdout.splitlines()
    return [row.split()[0] for row in rows[1:]]


def test_export_remove_import_gives_the_container_back(host: TestHost, box: str) -> None:
    machine_id = ssh(host, BOX, "echo precious > /srv/data.txt; cat /etc/machine-id").stdout
    config = host.run(["cat", "/etc/nspawnctl/box.yaml"]).stdout
    running = nspawnctl(host, "export", box, "/var/tmp/box.tar.zst", check=False)
    assert running.returncode == 2 and "box is running" in running.stderr
    assert "--force" in running.stderr
    stop(host, box)
    nspawnctl(host, "export", box, "/var/tmp/box.tar.zst")
    print("export of a layer:", host.run(["du", "-h", "/var/tmp/box.tar.zst"]).stdout.split()[0])
    members = host.run(["tar", "--zstd", "-tf", "/var/tmp/box.tar.zst"]).stdout.split()
    assert set(members[:3]) == {
        ".nspawnctl-export/",
        ".nspawnctl-export/manifest.json",
        ".nspawnctl-export/config.yaml",
    }
    assert "upper/srv/data.txt" in members
    assert not any(m.startswith("upper/usr/bin/") for m in members)  # the image is not in it

    nspawnctl(host, "remove", box)
    assert host.run(["test", "-e", "/etc/nspawnctl/box.yaml"], check=False).returncode == 1
    nspawnctl(host, "import", "/var/tmp/box.tar.zst")
    assert ssh(host, BOX, "cat /srv/data.txt; hostname").stdout.split() == ["precious", "box"]
    assert ssh(host, BOX, "cat /etc/machine-id").stdout == machine_id
    assert host.run(["cat", "/etc/nspawnctl/box.yaml"]).stdout == config


def test_full_export_is_an_image_and_imports_as_a_container(host: TestHost, box: str) -> None:
    machine_id = ssh(host, BOX, "echo whole > /srv/full.txt; cat /etc/machine-id").stdout
    stop(host, box)
    nspawnctl(host, "export", "--full", box, "/var/tmp/full.tar.zst")
    print("full export:", host.run(["du", "-h", "/var/tmp/full.tar.zst"]).stdout.split()[0])
    members = set(host.run(["tar", "--zstd", "-tf", "/var/tmp/full.tar.zst"]).stdout.split())
    assert {".nspawnctl-export/manifest.json", "./etc/os-release", "./srv/full.txt"} <= members

    # As it is, an image archive: a template for other containers.
    nspawnctl(host, "image", "import", "/var/tmp/full.tar.zst", "boxtpl")
    add(host, "clone", 2601, "--image", "template:boxtpl")
    out = ssh(host, 2601, "cat /srv/full.txt; ls -A /; hostname").stdout.split()
    assert out[0] == "whole" and out[-1] == "clone"
    assert ".nspawnctl-export" not in out

    # Imported beside the original, its port is taken: refused, and the template it
    # made for it is gone again.
    before = state(host)
    clash = nspawnctl(host, "import", "/var/tmp/full.tar.zst", "twin", check=False)
    assert clash.returncode == 2 and "already used by container 'box'" in clash.stderr
    assert state(host) == before

    # In place of the original: back on a template of its own, with a new identity.
    nspawnctl(host, "remove", box)
    nspawnctl(host, "import", "/var/tmp/full.tar.zst")
    assert "image: template:box" in host.run(["cat", "/etc/nspawnctl/box.yaml"]).stdout
    assert ssh(host, BOX, "cat /srv/full.txt /srv/data.txt").stdout.split() == [
        "whole",
        "precious",
    ]
    assert ssh(host, BOX, "cat /etc/machine-id").stdout != machine_id


def test_full_export_of_a_running_container_is_of_a_copy(host: TestHost, box: str) -> None:
    # Its mounted tree is the guest's to swap under tar: the archive is made from a copy
    # of its layer, stacked over the image version it runs on.
    ssh(host, BOX, "echo running > /srv/live.txt")
    nspawnctl(host, "export", "--full", "--force", box, "/var/tmp/live.tar.zst")
    members = set(host.run(["tar", "--zstd", "-tf", "/var/tmp/live.tar.zst"]).stdout.split())
    assert {"./etc/os-release", "./srv/live.txt", "./srv/full.txt"} <= members
    manifest = host.run(
        ["tar", "--zstd", "-xOf", "/var/tmp/live.tar.zst", ".nspawnctl-export/manifest.json"]
    ).stdout
    assert '"live": true' in manifest
    assert box in host.run(["machinectl", "list", "--no-legend"]).stdout  # it ran on
    host.run(["rm", "/var/tmp/live.tar.zst"])


def test_snapshot_change_rollback(host: TestHost, tick: str) -> None:
    # /etc/issue deleted before the snapshot, /etc/motd after: overlayfs marks each as
    # deleted in the layer (a whiteout), which the snapshot must keep as it is.
    ssh(host, TICK, "echo one > /srv/state; rm /etc/issue")
    before = state(host)
    refused = nspawnctl(host, "snapshot", tick, "s1", check=False)
    assert refused.returncode == 2 and "tick is running" in refused.stderr
    assert state(host) == before
    live = nspawnctl(host, "snapshot", "--force", tick, "live")
    assert live.stdout.strip() == "live" and "taken while it ran" in live.stderr
    # This host cannot freeze (hybrid cgroups): nothing froze, so no thaw is owed.
    assert "cannot be frozen" in live.stderr and "stays frozen" not in live.stderr
    intents = host.run(["ls", "/var/lib/nspawnctl/intents"], check=False).stdout.split()
    assert f"freeze-{tick}.json" not in intents

    stop(host, tick)
    assert nspawnctl(host, "snapshot", tick, "s1").stdout.strip() == "s1"
    listing = nspawnctl(host, "snapshot", "--list", tick).stdout.splitlines()
    assert listing[0].split() == ["SNAPSHOT", "CREATED", "SIZE", "IMAGE", "VERSION", "TAKEN"]
    rows = {row.split()[0]: row.split() for row in listing[1:]}
    assert rows["live"][-3:] == ["debian:bookworm", "v1", "running"]
    assert rows["s1"][-3:] == ["debian:bookworm", "v1", "stopped"]
    nspawnctl(host, "snapshot", "--remove", tick, "live")
    assert snapshot_names(host, tick) == ["s1"]

    ssh(host, TICK, "echo two > /srv/state; rm /etc/motd; echo back > /etc/issue")
    before = state(host)
    refused = nspawnctl(host, "rollback", tick, "s1", check=False)
    assert refused.returncode == 2 and "tick is running" in refused.stderr
    assert state(host) == before

    stop(host, tick)
    nspawnctl(host, "rollback", tick, "s1")
    out = ssh(
        host, TICK, "cat /srv/state; test -e /etc/motd && echo motd; cat /etc/issue", check=False
    )
    assert out.stdout.split()[:2] == ["one", "motd"]
    assert "No such file" in out.stderr
    assert ssh(host, TICK, "hostname").stdout.strip() == "tick"

    # `remove` keeps the snapshots, and a rollback adds the container again.
    machine_id = ssh(host, TICK, "cat /etc/machine-id").stdout
    nspawnctl(host, "remove", tick)
    assert snapshot_names(host, tick) == ["s1"]
    nspawnctl(host, "rollback", tick, "s1")
    assert ssh(host, TICK, "cat /srv/state /etc/machine-id").stdout == f"one\n{machine_id}"


def test_image_update_leaves_a_snapshot_that_undoes_it(host: TestHost, tick: str) -> None:
    ssh(host, TICK, "true")  # running: its snapshot is taken as it runs
    update = nspawnctl(
        host, "image", "update", "debian:bookworm", "--", "sh", "-c", "echo v2 > /etc/marker"
    )
    assert "snapshot pre-update-v2 of tick" in update.stderr
    rows = nspawnctl(host, "snapshot", "--list", tick).stdout.splitlines()
    pre = next(row.split() for row in rows if row.startswith("pre-update-v2"))
    assert pre[-2:] == ["v1", "running"]
    nspawnctl(host, "restart", tick)
    assert ssh(host, TICK, "cat /etc/marker").stdout.strip() == "v2"

    # The update is bad: back to before it, on the image version of then, kept for it.
    stop(host, tick)
    nspawnctl(host, "rollback", tick, "pre-update-v2")
    out = ssh(host, TICK, "cat /srv/state /etc/marker", check=False)
    assert out.stdout.strip() == "one" and "/etc/marker: No such file" in out.stderr
    lower = host.run(["findmnt", "-n", "-o", "OPTIONS", "/var/lib/machines/tick"]).stdout
    assert "/v1," in lower

    # --no-snapshot: none taken.
    stop(host, tick)
    nspawnctl(host, "image", "update", "--no-snapshot", "debian:bookworm", "--", "true")
    assert "pre-update-v3" not in snapshot_names(host, tick)


# A script run in the test host: a copy of an export's metadata plus one member that no
# export has, or with its YAML and manifest naming an image that is nowhere.
_CRAFT = r"""
import io, json, sys, tarfile
source, target, kind, tick, binds = sys.argv[1:]

def member(name, type=tarfile.REGTYPE, **fields):
    info = tarfile.TarInfo(name)
    info.type = type
    for key, value in fields.items():
        setattr(info, key, value)
    return info

with tarfile.open(source) as src, tarfile.open(target, "w") as out:
    # Where the host binds its own directories at each boot: links to host paths there.
    links = {"upper/etc/ssh/nspawnctl": "/root/.ssh", "upper/var/log/journal": "/srv/j"}
    for info in src:
        layer = kind == "bind-links" and not info.name.startswith(tuple(links))
        if not info.name.startswith(".nspawnctl-export") and not layer:
            continue
        data = src.extractfile(info).read() if info.isfile() else None
        if kind == "no-image" and info.name.endswith("config.yaml"):
            lines = data.decode().splitlines()
            data = "\n".join("image: template:nosuch" if l.startswith("image:") else l
                             for l in lines).encode() + b"\n"
        if kind == "no-image" and info.name.endswith("manifest.json"):
            manifest = json.loads(data)
            manifest["recipe"] = {"method": "template", "name": "nosuch"}
            data = json.dumps(manifest).encode()
        if kind == "bind-links" and info.name.endswith("config.yaml"):
            data = data.replace(f"listen: {tick}".encode(), f"listen: {binds}".encode())
        if data is not None:
            info.size = len(data)
        out.addfile(info, io.BytesIO(data) if data is not None else None)
    if kind == "bind-links":
        for where, link in links.items():
            out.addfile(member(where, tarfile.SYMTYPE, linkname=link))
    else:
        out.addfile(member("upper", tarfile.DIRTYPE, mode=0o755))
    evil = {
        "dotdot": member("upper/../../../var/tmp/escaped"),
        "absolute": member("/var/tmp/escaped"),
        "symlink": member("upper/etc/ssh", tarfile.SYMTYPE, linkname="../../../../etc/ssh"),
        "hardlink": member("upper/srv/shadow", tarfile.LNKTYPE, linkname="/etc/shadow"),
        "device": member("upper/srv/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
    }.get(kind)
    if evil is not None:
        out.addfile(evil, io.BytesIO(b"") if evil.isfile() else None)
"""


@pytest.fixture(scope="module")
def plain_export(host: TestHost, tick: str) -> str:
    stop(host, tick)
    nspawnctl(host, "export", tick, "/var/tmp/tick.tar")
    return "/var/tmp/tick.tar"


def craft(host: TestHost, source: str, kind: str) -> str:
    target = f"/var/tmp/{kind}.tar"
    host.run([sys.executable, "-c", _CRAFT, source, target, kind, str(TICK), str(BINDS)])
    return target


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("dotdot", 1, "has '..' in its path"),
        ("absolute", 1, "has an absolute path"),
        ("symlink", 1, "leads out of the tree"),
        ("hardlink", 1, "is a hard link to '/etc/shadow', outside the tree"),
        ("device", 1, "is a device node"),
        ("no-image", 2, "no image template:nosuch"),
    ],
)
def test_a_bad_archive_is_refused_and_changes_nothing(
    host: TestHost, plain_export: str, kind: str, code: int, message: str
) -> None:
    archive = craft(host, plain_export, kind)
    before = state(host)
    result = nspawnctl(host, "import", archive, "evil", check=False)
    assert (result.returncode, "Traceback" in result.stderr) == (code, False), result.stderr
    assert message in result.stderr, result.stderr
    assert state(host) == before
    assert host.run(["test", "-e", "/var/tmp/escaped"], check=False).returncode == 1


def test_links_where_the_host_binds_its_directories_keep_the_binds_in_the_guest(
    host: TestHost, plain_export: str
) -> None:
    """An archive whose layer has links where the host binds its own directories at
    each boot (the SSH keys at /etc/ssh/nspawnctl, the journal at /var/log/journal/ID),
    to host paths. The guest's root cannot plant them while it runs (the mount points
    are locked, their lower parents cannot be renamed on overlayfs), an archive can.
    systemd-nspawn resolves a bind's target inside the guest's root: both land in the
    guest's own tree, and sshd finds the keys there through the link."""
    archive = craft(host, plain_export, "bind-links")
    hosts_ssh = host.run(["ls", "-la", "/root/.ssh"]).stdout
    nspawnctl(host, "import", archive, "binds")
    machine_id = host.run(["cat", f"{STATE_IN_HOST}/layers/binds/machine-id"]).stdout.strip()
    assert ssh(host, BINDS, "ls /root/.ssh /srv/j").stdout.split() == [
        "/root/.ssh:",
        "authorized_keys.root",
        "/srv/j:",
        machine_id,
    ]
    assert host.run(["ls", "-la", "/root/.ssh"]).stdout == hosts_ssh
    assert host.run(["test", "-e", "/srv/j"], check=False).returncode == 1
    nspawnctl(host, "remove", "binds")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["import", "/var/tmp/truncated.tar.zst"], 1, "is damaged"),
        (["import", "/var/tmp/truncated.tar", "other"], 1, "is damaged"),
        (["import", "/etc/hostname", "other"], 1, "not a tar archive"),
        (["import", "/var/tmp/missing.tar", "other"], 1, "no such file"),
        (["import", "/var/tmp/tick.tar"], 2, "container 'tick' exists already"),
        (["rollback", "tick", "nosuch"], 2, "tick has no snapshot 'nosuch'"),
        (["snapshot", "tick", "s1"], 2, "tick has a snapshot 's1' already"),
        (["snapshot", "tick", "../up"], 2, "is not a snapshot name"),
        (["snapshot", "nobody"], 2, "no container 'nobody'"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    host: TestHost, plain_export: str, args: list[str], code: int, message: str
) -> None:
    for source, cut in (
        ("/var/tmp/box.tar.zst", "truncated.tar.zst"),
        (plain_export, "truncated.tar"),
    ):
        half = 'head -c $(( $(stat -c %s "$0") / 2 )) "$0" > "$1"'
        host.run(["sh", "-c", half, source, f"/var/tmp/{cut}"])
    before = state(host)
    result = nspawnctl(host, *args, check=False)
    assert (result.returncode, "Traceback" in result.stderr) == (code, False), result.stderr
    assert message in result.stderr, result.stderr
    assert "hint:" in result.stderr
    assert state(host) == before
