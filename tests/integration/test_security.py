"""Security defaults on real systemd: a guest's root is an unprivileged uid range of the
host (user namespace) while its image stays shared and owned by 0 (an ID-mapped bind, no
chown); no host device nodes; key-only SSH; capabilities dropped on request; no way to
the host's D-Bus; `security: {user_namespace: false}` as the way back."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from tests.integration.conftest import CLIENT_KEY, STATE_IN_HOST, cached_image, nspawnctl, ssh
from tests.integration.test_core import leftovers, wait_stopped
from tests.testhost import TestHost

MB = 2**20
PORT, ROOTNS_PORT, NOCAP_PORT = 2501, 2502, 2503
CAP_NET_RAW = 13
# What systemd-nspawn puts in a container's /dev: no disk, no memory, nothing of the host's.
NSPAWN_DEVICES = {
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/console",
    "/dev/net/tun",
    "/dev/ptmx",
}


def add(host: TestHost, name: str, port: int, security: str = "") -> None:
    text = f"ssh: {{listen: {port}, authorized_keys: [{CLIENT_KEY}.pub]}}\n{security}"
    host.write_file(f"/var/tmp/{name}.yaml", text)
    nspawnctl(host, "add", name, "-f", f"/var/tmp/{name}.yaml")


def uid_map(text: str) -> tuple[int, int, int]:
    inside, outside, count = text.split()[:3]
    return int(inside), int(outside), int(count)


def owner(host: TestHost, path: str) -> int:
    return int(host.run(["stat", "--format=%u", path]).stdout)


def layer(name: str) -> str:
    return f"{STATE_IN_HOST}/layers/{name}"


@pytest.fixture(scope="module")
def sec(host: TestHost) -> Iterator[str]:
    add(host, "sec", PORT)
    ssh(host, PORT, "true")
    yield "sec"


def test_guest_root_is_an_unprivileged_uid_of_the_host(host: TestHost, sec: str) -> None:
    over_ssh = uid_map(ssh(host, PORT, "cat /proc/self/uid_map").stdout)
    through_exec = uid_map(nspawnctl(host, "exec", sec, "--", "cat", "/proc/self/uid_map").stdout)
    assert over_ssh == through_exec
    inside, base, count = over_ssh
    assert (inside, count) == (0, 65536)
    assert base >= 0x80000 and base % 65536 == 0  # systemd's range for containers
    # Kept with the container: its layer's root directory is owned by the guest's root.
    assert owner(host, f"{layer(sec)}/upper") == base
    # On the host, the guest's processes run as that uid, not as root.
    leader = host.run(["machinectl", "show", "--property=Leader", "--value", sec]).stdout.strip()
    assert owner(host, f"/proc/{leader}") == base
    status = nspawnctl(host, "status", sec, "--json").stdout
    assert json.loads(status)["uid_range"] == [base, base + 65535]


def test_the_image_is_shared_and_the_layer_stays_small(host: TestHost, sec: str) -> None:
    base = uid_map(ssh(host, PORT, "cat /proc/self/uid_map").stdout)[1]
    ssh(host, PORT, "echo hello > /root/new-file && touch /etc/motd")
    # Copy-ups and new files land in the layer in the guest's uid range...
    assert owner(host, f"{layer(sec)}/upper/root/new-file") == base
    assert owner(host, f"{layer(sec)}/upper/etc/motd") == base
    # ...while the image on disk stays owned by 0, and shared: nothing was chowned.
    image = f"{STATE_IN_HOST}/images/{cached_image().key}"
    foreign = host.run(
        ["find", f"{image}/", "(", "-uid", "+65535", "-o", "-gid", "+65535", ")", "-print", "-quit"]
    )
    assert foreign.stdout == ""
    assert owner(host, f"{image}/current/usr/bin/bash") == 0
    size = int(host.run(["du", "-s", "--block-size=1", layer(sec)]).stdout.split()[0])
    print(f"layer of a user-namespaced container after boot, SSH and a file: {size / MB:.2f} MB")
    assert size <= 30 * MB
    # Its root is an overlay over an ID-mapped, read-only bind of the image version.
    options = host.run(["findmnt", "-n", "-o", "OPTIONS", f"/var/lib/machines/{sec}"]).stdout
    lower = re.search(r"lowerdir=([^,]+)", options).group(1)  # type: ignore[union-attr]
    assert lower == f"/run/nspawnctl/idmap/{base}{image}/{cached_image().current.name}"
    bind = host.run(["findmnt", "-n", "-o", "OPTIONS", lower]).stdout
    assert "idmapped" in bind.split(",") and "ro" in bind.split(",")


def test_the_image_bind_is_made_once_not_at_every_start(host: TestHost, sec: str) -> None:
    nspawnctl(host, "stop", sec)
    wait_stopped(host, sec)
    assert ssh(host, PORT, "echo up").stdout.strip() == "up"
    # Its unit ran at the first start only: since then its condition (bind not mounted) fails.
    unit = f"nspawnctl-lower@{sec}.service"
    result = host.run(["systemctl", "show", "--property=ConditionResult", "--value", unit])
    assert result.stdout.strip() == "no"


def test_the_guest_journal_reaches_the_host(host: TestHost, sec: str) -> None:
    """systemd-nspawn makes the host's journal directory of the guest owned by the host's
    root; the guest's journald, root of the guest only, could not write there."""
    said = ssh(host, PORT, "logger -t sectest hello-from-the-guest; cat /proc/self/uid_map")
    base = uid_map(said.stdout)[1]
    mid = host.run(["cat", f"{layer(sec)}/upper/etc/machine-id"]).stdout.strip()
    assert owner(host, f"/var/log/journal/{mid}") == base
    assert owner(host, f"/var/log/journal/{mid}/system.journal") == base
    host.wait_for(
        lambda: "hello-from-the-guest" in nspawnctl(host, "logs", sec).stdout,
        timeout=30,
        what="the guest's line in `nspawnctl logs`",
    )
    merged = host.run(["journalctl", "-m", "--no-pager", "-o", "cat", f"_MACHINE_ID={mid}"])
    assert "hello-from-the-guest" in merged.stdout


def test_without_a_user_namespace_root_is_the_host_root(host: TestHost) -> None:
    add(host, "rootns", ROOTNS_PORT, "security: {user_namespace: false}\n")
    assert uid_map(ssh(host, ROOTNS_PORT, "cat /proc/self/uid_map").stdout) == (0, 0, 2**32 - 1)
    assert owner(host, f"{layer('rootns')}/upper") == 0
    assert "the host's own (no user namespace)" in nspawnctl(host, "status", "rootns").stdout
    assert (
        host.run(
            ["test", "-e", "/etc/systemd/system/nspawnctl-lower@rootns.service"], check=False
        ).returncode
        == 1
    )


def test_no_device_node_of_the_host(host: TestHost, sec: str) -> None:
    # None in its root file system (the image store removes them), no disk in /dev.
    assert ssh(host, PORT, r"find / -xdev \( -type b -o -type c \) -print").stdout == ""
    assert ssh(host, PORT, "find /dev -type b").stdout == ""
    chars = set(ssh(host, PORT, "find /dev -type c").stdout.split())
    assert not {c for c in chars if not c.startswith("/dev/pts/")} - NSPAWN_DEVICES, chars
    # And the guest's root cannot make one: it has no CAP_MKNOD over the host's devices.
    made = ssh(host, PORT, "mknod /root/sda b 8 0 && head -c1 /root/sda", check=False)
    assert made.returncode != 0


def test_ssh_takes_keys_only(host: TestHost, sec: str) -> None:
    config = ssh(host, PORT, "sshd -T").stdout
    assert "passwordauthentication no" in config
    assert "kbdinteractiveauthentication no" in config
    refused = host.run(
        [
            "ssh",
            "-p",
            str(PORT),
            "-o",
            "BatchMode=yes",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "root@127.0.0.1",
            "true",
        ],
        check=False,
    )
    assert refused.returncode == 255
    assert "Permission denied (publickey)" in refused.stderr


def bounding_set(host: TestHost, port: int) -> int:
    status = ssh(host, port, "cat /proc/1/status").stdout
    return int(re.search(r"^CapBnd:\s+([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]


def test_drop_capabilities(host: TestHost, sec: str) -> None:
    add(host, "nocap", NOCAP_PORT, "security: {drop_capabilities: [CAP_NET_RAW]}\n")
    assert bounding_set(host, PORT) & (1 << CAP_NET_RAW)
    assert not bounding_set(host, NOCAP_PORT) & (1 << CAP_NET_RAW)
    # Not even the guest's root, in its login shell, has it.
    status = ssh(host, NOCAP_PORT, "cat /proc/self/status").stdout
    effective = int(re.search(r"^CapEff:\s+([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    assert not effective & (1 << CAP_NET_RAW)


def test_the_host_bus_is_out_of_reach(host: TestHost, sec: str) -> None:
    get_id = "busctl call org.freedesktop.DBus / org.freedesktop.DBus GetId"
    assert ssh(host, PORT, get_id).stdout != host.run(get_id.split()).stdout
    # The host's bus socket is not among the guest's sockets at all (not only at another
    # path): its inode does not show in the guest's /proc/net/unix.
    host_bus = [
        line.split()[6]
        for line in host.run(["cat", "/proc/net/unix"]).stdout.splitlines()
        if line.endswith(" /run/dbus/system_bus_socket")
    ]
    assert host_bus
    guest_inodes = {
        line.split()[6] for line in ssh(host, PORT, "cat /proc/net/unix").stdout.splitlines()[1:]
    }
    assert not set(host_bus) & guest_inodes


@pytest.mark.parametrize(
    ("security", "message"),
    [
        (
            "security: {drop_capabilities: [CAP_NOPE]}\n",
            "security.drop_capabilities[0]: 'CAP_NOPE' is not a Linux capability",
        ),
        (
            "security: {user_namespace: maybe}\n",
            "security.user_namespace: 'maybe' is a string, expected a boolean",
        ),
    ],
)
def test_bad_security_keys_exit_2_and_install_nothing(
    host: TestHost, security: str, message: str
) -> None:
    text = f"ssh: {{listen: 2599, authorized_keys: [{CLIENT_KEY}.pub]}}\n{security}"
    host.write_file("/var/tmp/badsec.yaml", text)
    result = nspawnctl(host, "add", "badsec", "-f", "/var/tmp/badsec.yaml", check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert leftovers(host, "badsec") == []


def test_remove_unmounts_the_image_bind(host: TestHost, sec: str) -> None:
    base = uid_map(ssh(host, PORT, "cat /proc/self/uid_map").stdout)[1]
    nspawnctl(host, "remove", sec)
    assert f"/run/nspawnctl/idmap/{base}/" not in host.run(["cat", "/proc/self/mountinfo"]).stdout
    assert host.run(["test", "-e", f"/run/nspawnctl/idmap/{base}"], check=False).returncode == 1
    assert leftovers(host, sec) == []
