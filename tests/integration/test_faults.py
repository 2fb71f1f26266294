"""kill -9 of nspawnctl at every step of add, remove, apply and image update: afterwards
the host is at the old state or the new one, never half-way; a rerun completes; nothing
the user had is lost. NSPAWNCTL_KILL_AT=N makes nspawnctl SIGKILL itself at its N-th
checkpoint (nspawnctl/intent.py); each test raises N until the command gets through."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests.integration.conftest import (
    CLIENT_KEY,
    STATE_IN_HOST,
    booted_host,
    cached_image,
    nspawnctl,
    ssh,
)
from tests.integration.test_core import leftovers
from tests.testhost import TestHost

KILLED = -signal.SIGKILL
MAX_POINTS = 60  # far more than any command has; a loop that never ends is a bug


@pytest.fixture(scope="module")
def host(private_store: Path) -> Iterator[TestHost]:
    """`image update` is among the commands killed: a store of this module's own."""
    with booted_host(private_store) as h:
        yield h


def killed_at(host: TestHost, point: int, *args: str) -> CompletedProcess[str]:
    # An image update copies the whole image: on a loaded CI machine one took over 120 s.
    return host.run(
        [sys.executable, "-m", "nspawnctl", *args],
        check=False,
        env={"NSPAWNCTL_KILL_AT": str(point)},
        timeout=600,
    )


def settle(host: TestHost) -> str:
    """Any next command settles what a killed one left; `list` changes nothing else."""
    return nspawnctl(host, "list").stderr


def every_fault_point(
    host: TestHost, args: tuple[str, ...], check: Callable[[int, str], None]
) -> int:
    """Kill `nspawnctl ARGS` at its 1st, 2nd, ... checkpoint; after each, settle and
    `check(point, what settle said)`. Returns how many points were hit."""
    for point in range(1, MAX_POINTS):
        result = killed_at(host, point, *args)
        if result.returncode != KILLED:
            assert result.returncode == 0, result
            return point - 1
        check(point, settle(host))
    raise AssertionError(f"nspawnctl {' '.join(args)} still killed after {MAX_POINTS} points")


def yaml_for(port: int, extra: str = "") -> str:
    return (
        f"image: debian:bookworm\nssh:\n  listen: {port}\n"
        f"  authorized_keys: [{CLIENT_KEY}.pub]\n{extra}"
    )


def test_add_killed_at_every_step_leaves_nothing_and_a_rerun_completes(host: TestHost) -> None:
    host.write_file("/root/k.yaml", yaml_for(2401))

    def nothing_left(point: int, said: str) -> None:
        assert leftovers(host, "k") == [], f"killed at point {point}"

    points = every_fault_point(host, ("add", "k", "-f", "/root/k.yaml"), nothing_left)
    print(f"add: {points} fault points")
    assert points >= 8
    assert ssh(host, 2401, "hostname").stdout.strip() == "k"


def test_remove_killed_at_every_step_is_finished_by_the_next_command(host: TestHost) -> None:
    host.write_file("/root/r.yaml", yaml_for(2402))
    nspawnctl(host, "add", "r", "-f", "/root/r.yaml")
    ssh(host, 2402, "true")  # running, with its journal

    def finished(point: int, said: str) -> None:
        assert "finished an interrupted `remove r`" in said, said
        assert leftovers(host, "r") == [], f"killed at point {point}"
        nspawnctl(host, "add", "r", "-f", "/root/r.yaml")  # for the next point

    points = every_fault_point(host, ("remove", "r"), finished)
    print(f"remove: {points} fault points")
    assert points >= 3
    assert leftovers(host, "r") == []


def test_apply_killed_at_every_step_keeps_the_old_state_and_the_users_data(
    host: TestHost,
) -> None:
    host.write_file("/root/fleet/p.yaml", yaml_for(2403))
    nspawnctl(host, "apply", "/root/fleet")
    ssh(host, 2403, "echo precious > /root/data")
    host.write_file("/root/fleet/p.yaml", yaml_for(2403, "hostname: changed\n"))

    def old_state(point: int, said: str) -> None:
        assert "took back an interrupted `apply p`" in said or "apply" not in said
        config = host.run(["cat", "/etc/nspawnctl/p.yaml"]).stdout
        assert "changed" not in config, f"killed at point {point}: config is new"
        assert ssh(host, 2403, "hostname; cat /root/data").stdout.split() == ["p", "precious"]

    points = every_fault_point(host, ("apply", "/root/fleet"), old_state)
    print(f"apply: {points} fault points")
    assert points >= 3
    assert ssh(host, 2403, "hostname; cat /root/data").stdout.split() == ["changed", "precious"]


def test_image_update_killed_at_every_step_leaves_units_on_a_version_that_exists(
    host: TestHost,
) -> None:
    host.write_file("/root/u.yaml", yaml_for(2404))
    nspawnctl(host, "add", "u", "-f", "/root/u.yaml")
    ssh(host, 2404, "echo mine > /root/data")
    image = f"{STATE_IN_HOST}/images/{cached_image().key}"
    unit_dir = "/etc/systemd/system"

    def consistent(point: int, said: str) -> None:
        current = host.run(["readlink", f"{image}/current"]).stdout.strip()
        assert host.run(["test", "-d", f"{image}/{current}"], check=False).returncode == 0
        # The units that mount the container's root name the current version: the update
        # was finished (new version) or never took (old one), never half-way.
        units = host.run(
            ["sh", "-c", f"cat {unit_dir}/var-lib-machines-u.mount {unit_dir}/nspawnctl-lower@u*"]
        ).stdout
        assert f"{image}/{current}" in units, f"killed at point {point}: {current}\n{units}"
        nspawnctl(host, "restart", "u")  # boots on the version its units name
        marker = ssh(host, 2404, "cat /root/data; cat /etc/marker 2>/dev/null || true").stdout
        assert marker.split() == (["mine"] if current == "v1" else ["mine", "updated"])

    args = ("image", "update", "debian:bookworm", "--", "sh", "-c", "echo updated > /etc/marker")
    points = every_fault_point(host, args, consistent)
    print(f"image update: {points} fault points")
    assert points >= 4
    nspawnctl(host, "restart", "u")
    assert ssh(host, 2404, "cat /root/data /etc/marker").stdout.split() == ["mine", "updated"]


def test_disk_full_while_adding_is_a_clear_error_and_leaves_nothing(host: TestHost) -> None:
    layers = f"{STATE_IN_HOST}/layers"
    host.write_file("/root/full.yaml", yaml_for(2405))
    # A file system with room for a few of the layer's files, not all of them.
    host.run(["mount", "-t", "tmpfs", "-o", "size=16k,nr_inodes=64", "tmpfs", layers])
    try:
        result = nspawnctl(host, "add", "full", "-f", "/root/full.yaml", check=False)
        listing = host.run(["ls", "-A", layers]).stdout
    finally:
        host.run(["umount", layers])
    assert result.returncode == 1, result
    assert "No space left on device" in result.stderr
    assert "that file system is full" in result.stderr
    assert listing == ""  # not even a hidden half-built layer
    assert leftovers(host, "full") == []
    assert ":2405 " not in host.run(["ss", "-Htln"]).stdout


def test_a_killed_container_leaves_its_socket_listening_and_boots_again(host: TestHost) -> None:
    host.write_file("/root/crash.yaml", yaml_for(2406))
    nspawnctl(host, "add", "crash", "-f", "/root/crash.yaml")
    service, socket = "systemd-nspawn@crash.service", "nspawnctl-crash.socket"

    def show(unit: str, prop: str) -> str:
        return host.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()

    # The nspawn process killed outright, then the guest's init (a guest crash).
    for victim in ("MainPID", "Leader"):
        ssh(host, 2406, "echo survived > /root/data")
        if victim == "MainPID":
            pid = show(service, "MainPID")
        else:
            pid = host.run(
                ["machinectl", "show", "crash", "--property=Leader", "--value"]
            ).stdout.strip()
        host.run(["kill", "-9", pid])
        host.wait_for(
            lambda: show(service, "ActiveState") in ("inactive", "failed"),
            timeout=60,
            what=f"the container gone after kill -9 of its {victim}",
        )
        assert show(socket, "ActiveState") == "active"
        assert ssh(host, 2406, "hostname; cat /root/data").stdout.split() == ["crash", "survived"]
