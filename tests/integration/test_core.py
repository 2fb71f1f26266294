"""The core path on real systemd: add -> the socket listens -> an SSH connection boots
the container -> stop leaves the socket listening -> logs merged -> remove leaves nothing."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from tests.integration.conftest import CLIENT_KEY, nspawnctl, squatter, ssh
from tests.testhost import TestHost

PORT = 2222


def unit_state(host: TestHost, unit: str) -> tuple[str, str]:
    out = host.run(["systemctl", "show", "-P", "ActiveState", unit]).stdout.strip()
    sub = host.run(["systemctl", "show", "-P", "SubState", unit]).stdout.strip()
    return out, sub


def machines(host: TestHost) -> list[str]:
    out = host.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_stopped(host: TestHost, name: str) -> None:
    host.wait_for(lambda: name not in machines(host), timeout=60, what=f"{name} powered off")
    host.wait_for(
        lambda: unit_state(host, f"systemd-nspawn@{name}.service")[0] == "inactive",
        timeout=60,
        what=f"systemd-nspawn@{name}.service inactive",
    )
    # Then its root is unmounted (StopWhenUnneeded=yes): a `machinectl start` while that
    # stop job runs is refused ("Transaction ... is destructive", seen under load).
    mount = f"var-lib-machines-{name}.mount"
    host.wait_for(
        lambda: unit_state(host, mount)[0] == "inactive", timeout=60, what=f"{mount} inactive"
    )


def leftovers(host: TestHost, name: str) -> list[str]:
    """Everything of container `name` on the test host; empty when nothing is left."""
    paths = [
        f"/etc/nspawnctl/{name}.yaml",
        f"/var/lib/machines/{name}",
        f"/etc/systemd/system/nspawnctl-{name}.socket",
        f"/etc/systemd/system/systemd-nspawn@{name}.service.d",
        f"/etc/systemd/nspawn/{name}.nspawn",
        f"/etc/systemd/system/var-lib-machines-{name}.mount",
        f"/etc/systemd/system/nspawnctl-lower@{name}.service",
        f"/etc/systemd/system/nspawnctl-gate@{name}.service",
        f"/var/lib/nspawnctl/layers/{name}",
        f"/var/lib/nspawnctl/hold/{name}",
    ]
    found = host.run(
        [
            "sh",
            "-c",
            'for p; do [ -e "$p" ] && echo "$p"; done; '
            'ls -a /var/lib/machines /var/lib/nspawnctl/layers | grep -F ".$0." || true',
            name,
            *paths,
        ]
    ).stdout
    loaded = host.run(
        [
            "systemctl",
            "list-units",
            "--all",
            "--no-legend",
            "--plain",
            f"nspawnctl-{name}.socket",
            f"systemd-nspawn@{name}.service",
            f"var-lib-machines-{name}.mount",
            f"nspawnctl-lower@{name}.service",
        ]
    ).stdout.strip()
    return found.split() + loaded.splitlines()


@pytest.fixture(scope="module")
def web(host: TestHost) -> Iterator[str]:
    added = nspawnctl(host, "add", "web", "--ssh", str(PORT), "--key", f"{CLIENT_KEY}.pub")
    assert "bootstrapping" not in added.stderr  # the image came from the cache
    yield "web"


def test_add_listens_without_booting(host: TestHost, web: str) -> None:
    assert unit_state(host, "nspawnctl-web.socket") == ("active", "listening")
    assert unit_state(host, "systemd-nspawn@web.service")[0] == "inactive"
    assert web not in machines(host)
    assert host.run(["pgrep", "-f", "systemd-nspawn.*--machine=web"], check=False).returncode == 1
    listening = host.run(["ss", "-Htln", f"sport = :{PORT}"]).stdout
    assert f":{PORT}" in listening


def test_ssh_connection_boots_the_container(host: TestHost, web: str) -> None:
    out = ssh(host, PORT, "hostname; cat /proc/1/comm; cat /etc/machine-id").stdout.split()
    assert out[:2] == ["web", "systemd"]
    assert out[2] != host.run(["cat", "/etc/machine-id"]).stdout.strip()
    assert web in machines(host)
    # The image's own sshd is masked: only the passed socket serves SSH.
    assert (
        ssh(host, PORT, "systemctl is-active ssh.service", check=False).stdout.strip() == "inactive"
    )


def test_stop_keeps_the_socket_and_the_next_connection_boots_again(
    host: TestHost, web: str
) -> None:
    ssh(host, PORT, "true")
    nspawnctl(host, "stop", web)
    wait_stopped(host, web)
    assert unit_state(host, "nspawnctl-web.socket") == ("active", "listening")
    assert ssh(host, PORT, "hostname").stdout.strip() == "web"

    host.run(["systemctl", "stop", "systemd-nspawn@web.service"])
    wait_stopped(host, web)
    assert unit_state(host, "nspawnctl-web.socket") == ("active", "listening")
    assert ssh(host, PORT, "hostname").stdout.strip() == "web"


def test_machinectl_drives_the_same_container(host: TestHost, web: str) -> None:
    ssh(host, PORT, "true")
    assert web in machines(host)
    shell = host.run(["machinectl", "shell", "--quiet", web, "/bin/cat", "/etc/hostname"])
    assert shell.stdout.strip() == "web"
    host.run(["machinectl", "poweroff", web])
    wait_stopped(host, web)
    assert unit_state(host, "nspawnctl-web.socket") == ("active", "listening")
    host.run(["machinectl", "start", web])
    host.wait_for(lambda: web in machines(host), timeout=60, what="machinectl start")
    assert ssh(host, PORT, "hostname").stdout.strip() == "web"


def test_exec_start_status_list(host: TestHost, web: str) -> None:
    nspawnctl(host, "stop", web)
    wait_stopped(host, web)
    run = nspawnctl(
        host, "exec", web, "--", "sh", "-c", "cat /etc/hostname; echo err >&2; exit 7", check=False
    )
    assert (run.returncode, run.stdout.strip(), run.stderr.strip()) == (7, "web", "err")
    status = json.loads(nspawnctl(host, "status", web, "--json").stdout)
    assert status["container"]["state"] == "running"
    # While the container runs, systemd calls its socket "running": the fd is lent out.
    assert status["socket"]["state"] == "running"
    assert status["machine"]["leader"] > 1
    nspawnctl(host, "stop", web)
    rows = json.loads(nspawnctl(host, "list", "--json").stdout)
    assert [(r["name"], r["socket"], r["container"], r["listen"]) for r in rows] == [
        ("web", "listening", "stopped", [str(PORT)])
    ]
    assert "web" in nspawnctl(host, "list").stdout


def test_start_returns_once_the_default_target_is_reached(host: TestHost, web: str) -> None:
    # The guest's systemd starts nspawnctl-boot.target (the passed sockets) and goes on
    # to its default target from there; `start` still waits for the whole boot.
    nspawnctl(host, "stop", web)
    wait_stopped(host, web)
    nspawnctl(host, "start", web)
    guest = ["systemctl", f"--machine={web}"]
    default = host.run([*guest, "get-default"]).stdout.strip()
    assert default == "graphical.target"  # the image's own, unchanged
    assert host.run([*guest, "is-active", default, "multi-user.target"]).stdout.split() == [
        "active",
        "active",
    ]
    assert host.run([*guest, "is-system-running"], check=False).stdout.strip() == "running"
    # Every setting nspawnctl wrote is one that systemd and systemd-nspawn know.
    unknown = r"Unknown (key|lvalue|section)|ignoring unknown"
    in_host = host.run(
        ["journalctl", "-q", "-u", f"systemd-nspawn@{web}.service", "-g", unknown], check=False
    ).stdout
    in_guest = host.run(["journalctl", "-q", "-M", web, "-b", "-g", unknown], check=False).stdout
    assert (in_host, in_guest) == ("", "")


def test_enable_and_disable(host: TestHost, web: str) -> None:
    wants = "/etc/systemd/system/sockets.target.wants/nspawnctl-web.socket"
    nspawnctl(host, "enable", web)
    assert host.run(["test", "-L", wants], check=False).returncode == 0
    nspawnctl(host, "disable", web)
    assert host.run(["test", "-e", wants], check=False).returncode == 1


def test_logs_all_merges_guest_and_host(host: TestHost, web: str) -> None:
    ssh(host, PORT, "logger -t nspawnctl-test hello-from-guest")

    def merged() -> bool:
        out = nspawnctl(host, "logs", "--all", "-n", "2000").stdout
        return "hello-from-guest" in out and "Accepted publickey for root" in out

    host.wait_for(merged, timeout=30, what="guest journal entries in logs --all")
    lines = nspawnctl(host, "logs", "--all", "-n", "2000").stdout.splitlines()
    guest = [ln for ln in lines if " web sshd[" in ln]
    host_lines = [ln for ln in lines if " testhost " in ln]
    assert guest and host_lines
    own = nspawnctl(host, "logs", web, "-n", "2000").stdout
    assert "hello-from-guest" in own
    # Still there with the container stopped and its root unmounted.
    nspawnctl(host, "stop", web)
    wait_stopped(host, web)
    assert "hello-from-guest" in nspawnctl(host, "logs", web, "-n", "2000").stdout
    assert "hello-from-guest" in nspawnctl(host, "logs", "--all", "-n", "2000").stdout


BAD_INPUTS = [
    ("bad1", ["--ssh", "70000", "--key", f"{CLIENT_KEY}.pub"], "not a port"),
    ("bad2", ["--ssh", str(PORT), "--key", f"{CLIENT_KEY}.pub"], "already used by container 'web'"),
    ("bad3", ["--ssh", "2300", "--key", CLIENT_KEY], "private key"),
    ("bad4", ["--ssh", "2300"], "--key"),
    ("bad5", ["--ssh", "2300", "--key", f"{CLIENT_KEY}.pub", "--image", "arch:latest"], "--image"),
]


@pytest.mark.parametrize(("name", "args", "message"), BAD_INPUTS)
def test_bad_input_exits_2_and_installs_nothing(
    host: TestHost, web: str, name: str, args: list[str], message: str
) -> None:
    result = nspawnctl(host, "add", name, *args, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(host, name) == []


def test_bad_yaml_file_exits_2(host: TestHost, web: str) -> None:
    host.write_file("/etc/nspawnctl/bad6.yaml", "ssh:\n  listn: 2300\n")
    result = nspawnctl(host, "add", "bad6", check=False)
    assert result.returncode == 2
    assert "bad6.yaml: ssh.listn: unknown key" in result.stderr
    assert "did you mean 'ssh.listen'" in result.stderr
    host.run(["rm", "/etc/nspawnctl/bad6.yaml"])
    assert leftovers(host, "bad6") == []


def test_failed_socket_start_undoes_everything(host: TestHost, web: str) -> None:
    """The socket fails only when systemd binds it (here: an address this host does not
    have), after the layer, the units and the config were written: `add` takes all of
    them back."""
    result = nspawnctl(
        host, "add", "busy", "--ssh", "10.9.9.9:2301", "--key", f"{CLIENT_KEY}.pub", check=False
    )
    assert result.returncode == 1
    assert "nspawnctl-busy.socket" in result.stderr
    assert leftovers(host, "busy") == []


def test_port_held_on_the_host_is_refused_before_anything_is_written(host: TestHost) -> None:
    with squatter(host, "AF_INET6", "::", 2301):
        result = nspawnctl(
            host, "add", "busy", "--ssh", "2301", "--key", f"{CLIENT_KEY}.pub", check=False
        )
    assert result.returncode == 2
    assert "port 2301/tcp is already in use on the host by python3" in result.stderr
    assert leftovers(host, "busy") == []


def test_never_overwrites_a_file_it_did_not_write(host: TestHost, web: str) -> None:
    host.write_file("/etc/systemd/nspawn/mine.nspawn", "[Exec]\nBoot=yes\n")
    result = nspawnctl(
        host, "add", "mine", "--ssh", "2302", "--key", f"{CLIENT_KEY}.pub", check=False
    )
    assert result.returncode == 1 and "not written by nspawnctl" in result.stderr
    assert host.run(["cat", "/etc/systemd/nspawn/mine.nspawn"]).stdout == "[Exec]\nBoot=yes\n"
    assert host.run(["test", "-e", "/etc/nspawnctl/mine.yaml"], check=False).returncode == 1


def test_names_never_shadow_host_units(host: TestHost) -> None:
    before = host.run(["systemctl", "cat", "dbus.service"]).stdout
    nspawnctl(host, "add", "dbus", "--ssh", "2303", "--key", f"{CLIENT_KEY}.pub")
    assert host.run(["systemctl", "cat", "dbus.service"]).stdout == before
    assert host.run(["systemctl", "is-active", "dbus.service"]).stdout.strip() == "active"
    nspawnctl(host, "remove", "dbus")
    assert leftovers(host, "dbus") == []


def test_remove_leaves_nothing(host: TestHost, web: str) -> None:
    mid = nspawnctl(host, "exec", web, "--", "cat", "/etc/machine-id").stdout.strip()
    nspawnctl(host, "remove", web)
    assert leftovers(host, web) == []
    assert host.run(["test", "-e", f"/var/log/journal/{mid}"], check=False).returncode == 1
    assert web not in machines(host)
    assert f":{PORT}" not in host.run(["ss", "-Htln"]).stdout


def test_layers_on_overlayfs_are_refused(host: TestHost) -> None:
    """The throw-away host's own root is an overlay: a layer there could never mount."""
    result = host.run(
        [
            sys.executable,
            "-m",
            "nspawnctl",
            "add",
            "ovl",
            "--ssh",
            "2304",
            "--key",
            f"{CLIENT_KEY}.pub",
        ],
        check=False,
        env={"NSPAWNCTL_STATE_DIR": "/var/lib/nspawnctl-on-overlay"},
    )
    assert result.returncode == 1
    assert "is on overlayfs, which cannot hold a container's layer" in result.stderr
    assert leftovers(host, "ovl") == []
