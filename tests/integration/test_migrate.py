"""nspawnctl migrate on real hosts over real OpenSSH (fleetnet.py): a container moved with
its data, its image sent where it is missing, and a kill at every step or a cut link
leaving it whole on one side. Apart from test_remote.py so that the two fleets run at
once (one pytest worker per module)."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE, CompletedProcess

import pytest

from tests.integration.conftest import CLIENT_KEY, nspawnctl, ssh_argv
from tests.integration.fleetnet import Fleet, far_ssh, fleet, newcomer, on_client


@pytest.fixture(scope="module")
def hosts(image_cache: Path) -> Iterator[Fleet]:
    with fleet(image_cache) as f:
        yield f


def _on(f: Fleet, server: int) -> set[str]:
    """The containers a server has: YAML, units and layer."""
    return {
        row["name"] for row in json.loads(nspawnctl(f.servers[server], "list", "--json").stdout)
    }


def _machine_id(f: Fleet, server: int, name: str) -> str:
    return str(
        json.loads(nspawnctl(f.servers[server], "status", name, "--json").stdout)["machine_id"]
    )


def test_migrate_moves_a_running_container_with_its_data(hosts: Fleet) -> None:
    a, b = hosts.address(0), hosts.address(1)
    key = f"{CLIENT_KEY}.pub"
    on_client(hosts, "-H", a, "add", "mover", "--ssh", "2600", "--key", key)
    far_ssh(hosts, 0, "2600", "head -c 1000000 /dev/urandom > /srv/data; sha256sum /srv/data")
    data = far_ssh(hosts, 0, "2600", "sha256sum /srv/data").split()[0]
    identity = _machine_id(hosts, 0, "mover")
    try:
        moved = on_client(hosts, "-H", a, "migrate", "mover", "--to", b)
        assert "moved to" in moved.stderr and "closed for" in moved.stderr, moved.stderr
        # Running: copied while it ran, then only what changed went while it was stopped.
        assert "copied while it runs" in moved.stderr, moved.stderr
        assert "what changed meanwhile sent" in moved.stderr, moved.stderr
        assert "mover" not in _on(hosts, 0) and "mover" in _on(hosts, 1)
        left = hosts.servers[0].run(["ls", "/var/lib/nspawnctl/layers"]).stdout.split()
        assert "mover" not in left
        # Its socket boots it there, with its data and its identity.
        assert far_ssh(hosts, 1, "2600", "sha256sum /srv/data").split()[0] == data
        assert _machine_id(hosts, 1, "mover") == identity
        refused = hosts.client.run([*ssh_argv(2600, "true")[:-2], f"root@{a}", "true"], check=False)
        assert refused.returncode != 0

        # A host whose ports clash: refused before anything changes on either side.
        on_client(hosts, "-H", a, "add", "squat", "--ssh", "2600", "--key", key)
        clash = on_client(hosts, "-H", b, "migrate", "mover", "--to", a, check=False)
        assert clash.returncode != 0 and "2600" in clash.stderr, clash.stderr
        assert "mover" in _on(hosts, 1) and "mover" not in _on(hosts, 0)
        assert far_ssh(hosts, 1, "2600", "hostname").strip() == "mover"
    finally:
        for index, name in ((0, "mover"), (1, "mover"), (0, "squat")):
            nspawnctl(hosts.servers[index], "remove", name, check=False)


# Each step of a migrate, by its checkpoint's name (migrate.py).
MIGRATE_STEPS = (
    "checked",
    "copied while running",
    "socket closed",
    "exported",
    "sent",
    "imported there",
    "finishing",
)


def _migrate_on(
    f: Fleet, src: int, dst: int, *, env: dict[str, str] | None = None, check: bool = True
) -> CompletedProcess[str]:
    argv = [sys.executable, "-m", "nspawnctl", "migrate", "roamer", "--to", f.address(dst)]
    return f.servers[src].run(argv, env=env, check=check, timeout=300)


def _whole_on_one_side(f: Fleet, src: int, dst: int, data: str) -> None:
    """After a kill: it is here, with its layer, or there with its socket listening."""
    here, there = "roamer" in _on(f, src), "roamer" in _on(f, dst)
    assert here or there
    if there:
        status = json.loads(nspawnctl(f.servers[dst], "status", "roamer", "--json").stdout)
        assert status["socket"]["state"] == "listening"
    if here:
        layer = "/var/lib/nspawnctl/layers/roamer/upper/srv/data"
        assert f.servers[src].run(["sha256sum", layer]).stdout.split()[0] == data


def test_a_migrate_killed_at_each_step_is_finished_by_running_it_again(hosts: Fleet) -> None:
    key = f"{CLIENT_KEY}.pub"
    on_client(hosts, "-H", hosts.address(0), "add", "roamer", "--ssh", "2700", "--key", key)
    on_client(hosts, "-H", hosts.address(0), "enable", "roamer")
    far_ssh(hosts, 0, "2700", "head -c 300000 /dev/urandom > /srv/data")
    data = far_ssh(hosts, 0, "2700", "sha256sum /srv/data").split()[0]
    src, dst = 0, 1
    try:
        for step in MIGRATE_STEPS:
            killed = _migrate_on(hosts, src, dst, env={"NSPAWNCTL_KILL_AT": step}, check=False)
            assert killed.returncode != 0 and "SIGKILL at migrate: " in killed.stderr, (
                step,
                killed.stderr,
            )
            _whole_on_one_side(hosts, src, dst, data)
            again = _migrate_on(hosts, src, dst)
            assert "roamer" not in _on(hosts, src) and "roamer" in _on(hosts, dst), again.stderr
            # Enabled here, enabled there: also when the killed run had disabled it here.
            status = json.loads(nspawnctl(hosts.servers[dst], "status", "roamer", "--json").stdout)
            assert status["socket"]["enabled"] == "enabled", (step, status["socket"])
            assert far_ssh(hosts, dst, "2700", "sha256sum /srv/data").split()[0] == data
            src, dst = dst, src  # the next step moves it back

        # A connection cut while the archive is on its way: kept here, stopped and
        # whole; the far side has nothing; running it again finishes.
        argv = [sys.executable, "-m", "nspawnctl", "migrate", "roamer", "--to", hosts.address(dst)]
        verb = hosts.servers[src].popen(
            argv, env={"NSPAWNCTL_PAUSE_AT": "roamer sent"}, stdout=PIPE, stderr=PIPE
        )
        paused = ["sh", "-c", "ps -o stat= -p $(pgrep -f 'nspawnctl migrate roamer') | grep -q T"]
        hosts.servers[src].wait_for(
            lambda: hosts.servers[src].run(paused, check=False).returncode == 0,
            timeout=120,
            what="migrate paused with the archive sent",
        )
        hosts.servers[dst].run(["ip", "link", "set", "eth0", "down"])
        try:
            hosts.servers[src].run(["pkill", "-CONT", "-f", "nspawnctl migrate roamer"])
            verb.send_signal(signal.SIGCONT)  # nsenter, out here, stopped itself with its child
            _out, err = verb.communicate(timeout=300)
        finally:
            hosts.servers[dst].run(["ip", "link", "set", "eth0", "up"])
        assert verb.returncode == 1 and "import: ssh:" in err, err
        assert "roamer" in _on(hosts, src) and "roamer" not in _on(hosts, dst)
        settled = nspawnctl(hosts.servers[src], "list")
        assert "`migrate roamer`" in settled.stderr and "was cut short" in settled.stderr
        _migrate_on(hosts, src, dst)
        assert far_ssh(hosts, dst, "2700", "sha256sum /srv/data").split()[0] == data
        assert "roamer" not in _on(hosts, src)
    finally:
        for server in hosts.servers:
            nspawnctl(server, "remove", "roamer", check=False)


def test_migrate_sends_the_image_to_a_host_that_has_none(hosts: Fleet) -> None:
    """A host whose store is empty gets the exact image version the layer sits on, under
    its recipe's key and checked by its digest; the container boots there on it."""
    a = hosts.address(0)
    key = f"{CLIENT_KEY}.pub"
    store = Path(tempfile.mkdtemp(prefix="nspawnctl-empty-store-", dir="/var/tmp"))
    try:
        with newcomer(hosts, store) as (bare, c):
            on_client(hosts, "-H", a, "add", "lone", "--ssh", "2800", "--key", key)
            far_ssh(hosts, 0, "2800", "head -c 200000 /dev/urandom > /srv/data")
            data = far_ssh(hosts, 0, "2800", "sha256sum /srv/data").split()[0]
            try:
                moved = on_client(hosts, "-H", a, "migrate", "lone", "--to", c)
                assert "lacks this version of image" in moved.stderr, moved.stderr
                assert "moved to" in moved.stderr, moved.stderr
                here, there = (
                    json.loads(nspawnctl(server, "image", "list", "--json", "--digest").stdout)
                    for server in (hosts.servers[0], bare)
                )
                # One image there, the very version it sat on here: same key, same digest.
                assert len(there) == 1, there
                assert {i["key"]: i["digest"] for i in here}[there[0]["key"]] == there[0]["digest"]
                assert there[0]["containers"] == ["lone"]
                argv = ssh_argv(2800, "sha256sum /srv/data")
                argv[-2] = f"root@{c}"
                assert hosts.client.run(argv, timeout=120).stdout.split()[0] == data
                assert "lone" not in _on(hosts, 0)

                # The host moves on to another version of the image: the next container
                # gets its own version beside it, and sits on that one there.
                nspawnctl(bare, "remove", "lone")
                update = ["image", "update", "--no-snapshot", "debian:bookworm"]
                nspawnctl(bare, *update, "--", "touch", "/etc/marker")
                on_client(hosts, "-H", a, "add", "lone2", "--ssh", "2801", "--key", key)
                moved = on_client(hosts, "-H", a, "migrate", "lone2", "--to", c)
                assert "has another version (v2)" in moved.stderr, moved.stderr
                [image] = json.loads(nspawnctl(bare, "image", "list", "--json", "--digest").stdout)
                ours = {i["key"]: i["digest"] for i in here}[image["key"]]
                assert image["version"] == "v2" and image["versions"]["v3"] == ours, image
                argv = ssh_argv(2801, "test -e /etc/marker && echo updated || echo ours")
                argv[-2] = f"root@{c}"
                assert hosts.client.run(argv, timeout=120).stdout.strip() == "ours"
                # A change of its YAML there leaves it on that version; so does a restart.
                nspawnctl(bare, "set", "lone2", "resources.memory=300M")
                nspawnctl(bare, "stop", "lone2")
                assert hosts.client.run(argv, timeout=120).stdout.strip() == "ours"
            finally:
                for server, name in itertools.product((hosts.servers[0], bare), ("lone", "lone2")):
                    nspawnctl(server, "remove", name, check=False)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(store)], check=False)
