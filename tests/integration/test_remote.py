"""nspawnctl -H on real hosts over real OpenSSH: two throw-away servers running sshd
and nspawnctl, and a client host that reaches them over a private bridge
(fleetnet.py), as an admin's laptop reaches its servers."""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests.integration.conftest import CLIENT_KEY, nspawnctl
from tests.integration.fleetnet import DOWN, Fleet, far_ssh, fleet, on_client
from tests.testhost import CHECKOUT

WEB = "2222"


@pytest.fixture(scope="module")
def hosts(image_cache: Path) -> Iterator[Fleet]:
    with fleet(image_cache) as f:
        yield f


def test_every_verb_works_against_one_host(hosts: Fleet) -> None:
    a = hosts.address(0)
    # --key names a file of the client: it travels with the call.
    added = on_client(hosts, "-H", a, "add", "web", "--ssh", WEB, "--key", f"{CLIENT_KEY}.pub")
    assert added.returncode == 0, added.stderr
    assert nspawnctl(hosts.servers[0], "list").stdout.split()[6] == "web"
    assert "web" not in nspawnctl(hosts.servers[1], "list").stdout

    rows = json.loads(on_client(hosts, "-H", a, "list", "--json").stdout)
    assert [(r["name"], r["socket"], r["container"]) for r in rows] == [
        ("web", "listening", "stopped")
    ]
    # Its socket on the server boots it for a client that comes across the network.
    assert far_ssh(hosts, 0, WEB, "hostname").strip() == "web"
    status = json.loads(on_client(hosts, "-H", a, "status", "web", "--json").stdout)
    assert status["container"]["state"] == "running"
    shown = on_client(hosts, "-H", a, "exec", "web", "--", "cat", "/etc/hostname")
    assert shown.stdout == "web\n"
    logs = on_client(hosts, "-H", a, "logs", "web", "-n", "200").stdout
    assert "sshd" in logs

    # With a terminal here, the far verb has one: an interactive shell in the container.
    _shell_on_a_terminal(hosts, a)

    # Exit codes are nspawnctl's own, from the far side.
    missing = on_client(hosts, "-H", a, "status", "nosuch", check=False)
    assert (
        missing.returncode
        == nspawnctl(hosts.servers[0], "status", "nosuch", check=False).returncode
    )
    assert missing.returncode != 0 and "nosuch" in missing.stderr

    on_client(hosts, "-H", a, "stop", "web")
    stopped = json.loads(on_client(hosts, "-H", a, "status", "web", "--json").stdout)
    assert stopped["container"]["state"] == "stopped"

    # apply DIR: a directory of the client's YAML files goes across, each as this
    # machine reads it: a link to a shared file is the file.
    hosts.client.run(["mkdir", "-p", "/root/fleet"])
    hosts.client.run(["ln", "-s", "../shared/api.yaml", "/root/fleet/api.yaml"])
    hosts.client.write_file(
        "/root/shared/api.yaml",
        f"image: debian:bookworm\nssh:\n  listen: 2223\n  authorized_keys:\n"
        f"    - {hosts.client.run(['cat', f'{CLIENT_KEY}.pub']).stdout.strip()}\n",
    )
    applied = on_client(hosts, "-H", a, "apply", "/root/fleet")
    assert applied.returncode == 0, applied.stderr
    assert "api" in nspawnctl(hosts.servers[0], "list").stdout

    # export writes on the client; import on the other server reads it from the client.
    on_client(hosts, "-H", a, "export", "web", "/root/web.tar.zst")
    assert int(hosts.client.run(["stat", "-c", "%s", "/root/web.tar.zst"]).stdout) > 1000
    on_client(hosts, "-H", hosts.address(1), "import", "/root/web.tar.zst")
    assert far_ssh(hosts, 1, WEB, "hostname").strip() == "web"
    # Nothing of the call is left on the far hosts.
    for host in hosts.servers:
        left = host.run(["sh", "-c", "ls -d /var/tmp/nspawnctl-client.* 2>/dev/null; true"])
        assert left.stdout == ""

    for index in (0, 1):
        on_client(hosts, "-H", hosts.address(index), "remove", "web")
    on_client(hosts, "-H", a, "remove", "api")
    assert "web" not in nspawnctl(hosts.servers[0], "list").stdout


def test_a_fleet_list_has_a_host_column_and_a_row_for_a_host_that_is_down(
    hosts: Fleet,
) -> None:
    a, b = hosts.address(0), hosts.address(1)
    key = f"{CLIENT_KEY}.pub"
    on_client(hosts, "-H", a, "add", "one", "--ssh", "2301", "--key", key)
    on_client(hosts, "-H", b, "add", "two", "--ssh", "2302", "--key", key)
    try:
        listed = on_client(hosts, "-H", a, "-H", b, "-H", DOWN, "list", check=False)
        assert listed.returncode == 1  # one host could not be asked
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:3] == ["HOST", "NAME", "SOCKET"]
        rows = {tuple(line.split()[:2]) for line in lines[1:]}
        assert (a, "one") in rows and (b, "two") in rows
        down = [line for line in lines if line.startswith(DOWN)]
        assert len(down) == 1 and "error:" in down[0], listed.stdout

        # status of a fleet: the host that has no such container says so in its row.
        status = on_client(hosts, "-H", a, "-H", b, "status", "one", check=False)
        assert status.returncode == 1
        by_host = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
        assert by_host[a].split()[1:3] == ["one", "listening"], status.stdout
        assert "error: no container 'one'" in by_host[b], status.stdout

        rows_json = json.loads(on_client(hosts, "-H", a, "-H", b, "list", "--json").stdout)
        assert sorted((r["host"], r["name"]) for r in rows_json) == [(a, "one"), (b, "two")]

        # A host with a broken YAML: its containers are listed, and so is its error.
        hosts.servers[1].write_file("/etc/nspawnctl/broken.yaml", "image: [\n")
        try:
            mixed = on_client(hosts, "-H", a, "-H", b, "list", "--json", check=False)
        finally:
            hosts.servers[1].run(["rm", "/etc/nspawnctl/broken.yaml"])
        assert mixed.returncode == 1, mixed.stderr
        rows_json = json.loads(mixed.stdout)
        assert {(r["host"], r.get("name")) for r in rows_json} == {
            (a, "one"),
            (b, "two"),
            (b, None),
        }
        assert "broken.yaml" in next(r["error"] for r in rows_json if "error" in r), mixed.stdout
    finally:
        on_client(hosts, "-H", a, "remove", "one")
        on_client(hosts, "-H", b, "remove", "two")


def test_bad_input_is_one_clear_error_and_changes_nothing(hosts: Fleet) -> None:
    a = hosts.address(0)
    before = nspawnctl(hosts.servers[0], "list").stdout
    add = ["add", "bad", "--ssh", "2400", "--key", f"{CLIENT_KEY}.pub"]

    down = on_client(hosts, "-H", DOWN, *add, check=False)
    assert down.returncode == 1 and f"{DOWN}: connecting:" in down.stderr, down.stderr

    # A key the server does not know: ssh's own words, and a hint at ssh.
    hosts.client.run(["mkdir", "-p", "/root/stranger/.ssh"])
    hosts.client.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/root/stranger/.ssh/id_ed25519"]
    )
    # ssh takes ~ from the password database, not $HOME: the user's config names the key.
    config = "StrictHostKeyChecking accept-new\n"
    stranger = "IdentityFile /root/stranger/.ssh/id_ed25519\nIdentitiesOnly yes\n"
    hosts.client.write_file("/root/.ssh/config", config + stranger, 0o600)
    try:
        refused = on_client(hosts, "-H", a, *add, check=False)
    finally:
        hosts.client.write_file("/root/.ssh/config", config, 0o600)
    assert refused.returncode == 1 and "Permission denied" in refused.stderr, refused.stderr
    assert "hint: check `ssh" in refused.stderr

    # A host without nspawnctl where it is looked for, and one with another version.
    none = on_client(
        hosts,
        "-H",
        a,
        *add,
        check=False,
        env={"NSPAWNCTL_REMOTE_COMMAND": "/opt/nowhere/nspawnctl"},
    )
    assert none.returncode == 1 and "has no '/opt/nowhere/nspawnctl'" in none.stderr
    hosts.servers[0].write_file(
        "/usr/local/sbin/nspawnctl-old",
        '#!/bin/sh\necho "$@" >> /root/old-calls\necho "nspawnctl 0.1.0"\n',
        0o755,
    )
    old = on_client(
        hosts, "-H", a, *add, check=False, env={"NSPAWNCTL_REMOTE_COMMAND": "nspawnctl-old"}
    )
    assert old.returncode == 1 and "has nspawnctl 0.1.0, this is" in old.stderr, old.stderr
    # It was asked its version, and nothing else.
    assert hosts.servers[0].run(["cat", "/root/old-calls"]).stdout == "--version\n"
    # A sudo that wants a password (there is no terminal for it): its own words.
    hosts.servers[0].write_file(
        "/usr/local/sbin/fake-sudo",
        '#!/bin/sh\necho "sudo: a terminal is required to read the password" >&2\nexit 1\n',
        0o755,
    )
    sudo = {"NSPAWNCTL_REMOTE_COMMAND": "fake-sudo nspawnctl"}
    asked = on_client(hosts, "-H", a, *add, check=False, env=sudo)
    assert asked.returncode == 1, asked.stderr
    assert "a terminal is required to read the password" in asked.stderr, asked.stderr

    # A bad -H is refused before ssh is started.
    bad = on_client(hosts, "-H", "-oProxyCommand=touch /root/pwned", "list", check=False)
    assert bad.returncode == 2 and "not [USER@]HOST[:PORT]" in bad.stderr
    assert hosts.client.run(["test", "-e", "/root/pwned"], check=False).returncode != 0

    assert nspawnctl(hosts.servers[0], "list").stdout == before


def _shell_on_a_terminal(f: Fleet, address: str) -> None:
    client = f.client

    def pane() -> str:
        return client.run(["tmux", "capture-pane", "-p", "-t", "far"]).stdout

    command = shlex.join([sys.executable, "-m", "nspawnctl", "-H", address, "shell", "web"])
    client.run(["tmux", "new-session", "-d", "-s", "far", "-x", "120", "-y", "30", command])
    try:
        # The prompt of a shell that reads this terminal, then a line it computed. Keys
        # typed before the prompt are dropped as the login sets the terminal up.
        client.wait_for(lambda: "root@web:" in pane(), timeout=60, what="the far shell's prompt")
        client.run(["tmux", "send-keys", "-t", "far", "echo $((6*7))-$(hostname)", "Enter"])
        try:
            client.wait_for(lambda: "42-web" in pane(), timeout=60, what="the far shell's answer")
        except TimeoutError as err:
            raise AssertionError(f"{err}; the terminal shows:\n{pane()}") from None
        client.run(["tmux", "send-keys", "-t", "far", "exit", "Enter"])
        gone = ["tmux", "has-session", "-t", "far"]
        client.wait_for(
            lambda: client.run(gone, check=False).returncode != 0,
            timeout=30,
            what="the shell to end",
        )
    finally:
        client.run(["tmux", "kill-server"], check=False)


# --- the Ansible collection (contrib/ansible), with the real ansible-core ------------

COLLECTION = CHECKOUT / "contrib/ansible"


def _playbook(f: Fleet, *extra: str, check: bool = True) -> CompletedProcess[str]:
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "/root/inventory"]
    argv += [str(COLLECTION / "playbooks/fleet.yml"), "-e", "nspawnctl_fleet_dir=/root/yaml"]
    env = {
        "ANSIBLE_COLLECTIONS_PATH": "/root/collections",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    return f.client.run([*argv, *extra], check=check, env=env, timeout=600)


def _changed(recap: str) -> dict[str, int]:
    """Each host's changed= count in the PLAY RECAP."""
    found = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", recap, re.MULTILINE)
    return {host: int(n) for host, n in found}


def test_the_example_playbook_puts_a_directory_of_yaml_on_every_host(hosts: Fleet) -> None:
    galaxy = str(Path(sys.executable).parent / "ansible-galaxy")
    hosts.client.run([galaxy, "collection", "install", str(COLLECTION), "-p", "/root/collections"])
    servers = [hosts.address(i) for i in range(len(hosts.servers))]
    hosts.client.write_file(
        "/root/inventory",
        "[nspawn_hosts]\n" + "\n".join(servers) + "\n[nspawn_hosts:vars]\n"
        "ansible_user=root\nansible_python_interpreter=/usr/bin/python3\n",
    )
    key = hosts.client.run(["cat", f"{CLIENT_KEY}.pub"]).stdout.strip()
    db = f"image: debian:bookworm\nssh:\n  listen: 2500\n  authorized_keys: ['{key}']\n"
    hosts.client.write_file("/root/yaml/db.yaml", db)
    try:
        first = _playbook(hosts)
        assert _changed(first.stdout) == dict.fromkeys(servers, 1), first.stdout
        for server in hosts.servers:
            assert "db" in nspawnctl(server, "list").stdout
        assert far_ssh(hosts, 1, "2500", "hostname").strip() == "db"

        second = _playbook(hosts)
        assert _changed(second.stdout) == dict.fromkeys(servers, 0), second.stdout

        # A pending change: shown with --check --diff, and not made.
        hosts.client.write_file("/root/yaml/db.yaml", db + "idle_timeout: 5min\n")
        checked = _playbook(hosts, "--check", "--diff")
        assert _changed(checked.stdout) == dict.fromkeys(servers, 1), checked.stdout
        assert re.search(r'^\+\s+"idle_timeout": "5min",$', checked.stdout, re.M), checked.stdout
        config = nspawnctl(hosts.servers[0], "status", "db", "--json").stdout
        path = json.loads(config)["config"]
        assert "5min" not in hosts.servers[0].run(["cat", path]).stdout

        # A bad key: the task fails with nspawnctl's own message, and nothing changes.
        hosts.client.write_file("/root/yaml/db.yaml", db + "idle_timout: 5min\n")
        failed = _playbook(hosts, check=False)
        assert failed.returncode != 0
        assert "nspawnctl: error:" in failed.stdout and "idle_timout" in failed.stdout
        assert "5min" not in hosts.servers[0].run(["cat", path]).stdout
    finally:
        for address in servers:
            on_client(hosts, "-H", address, "remove", "db", check=False)


# --- migrate ------------------------------------------------------------------------
