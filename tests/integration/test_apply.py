"""A fleet run declaratively: `apply` on a directory of YAML files, resource limits
rendered into the container's unit, and `set` changing them on a running container."""

from __future__ import annotations

import json

from tests.integration.conftest import CLIENT_KEY, nspawnctl, ssh, ssh_argv
from tests.integration.test_core import leftovers, machines
from tests.integration.test_idle import leader
from tests.testhost import TestHost

FLEET = "/root/fleet"
NAMES = ("a", "b", "c", "d")


def yaml_for(port: int, extra: str = "") -> str:
    return (
        f"image: debian:bookworm\nssh:\n  listen: {port}\n"
        f"  authorized_keys: [{CLIENT_KEY}.pub]\n{extra}"
    )


def show(host: TestHost, unit: str, prop: str) -> str:
    return host.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()


def changed_files(host: TestHost, marker: str) -> list[str]:
    """Files nspawnctl writes (config, host units, the guest's units in its layer) that
    changed since `marker`; not what a running guest writes itself (its logs, say)."""
    host_files = host.run(["find", "/etc/nspawnctl", "/etc/systemd", "-newer", marker]).stdout
    guest_files = host.run(
        ["find", "/var/lib/nspawnctl/layers", "-path", "*/upper/etc/*", "-newer", marker]
    ).stdout
    return sorted((host_files + guest_files).split())


def test_apply_installs_four_reports_the_broken_fifth_and_is_idempotent(
    host: TestHost,
) -> None:
    for index, name in enumerate(NAMES):
        host.write_file(f"{FLEET}/{name}.yaml", yaml_for(2301 + index))
    host.write_file(f"{FLEET}/e.yaml", yaml_for(2305, "idle_timout: 10min\n"))

    first = nspawnctl(host, "apply", FLEET, check=False)
    assert first.returncode == 2, first
    for name in NAMES:
        assert f"+ {name}: new container" in first.stdout
    assert "e.yaml: idle_timout: unknown key" in first.stderr
    assert "did you mean 'idle_timeout'?" in first.stderr
    assert "4 added: a b c d" in first.stdout
    listening = host.run(["ss", "-Htln"]).stdout
    for port in (2301, 2302, 2303, 2304):
        assert f":{port} " in listening
    assert ":2305 " not in listening
    assert ssh(host, 2302, "hostname").stdout.strip() == "b"

    host.run(["touch", "/root/marker"])
    second = nspawnctl(host, "apply", FLEET, check=False)
    assert second.returncode == 2  # e.yaml is still broken, and still said so
    assert "nothing to do: 4 container(s) up to date; 1 broken YAML: e" in second.stdout
    assert changed_files(host, "/root/marker") == []


def test_dry_run_shows_a_diff_and_changes_nothing(host: TestHost) -> None:
    host.write_file(f"{FLEET}/b.yaml", yaml_for(2302, "hostname: bee\n"))
    host.run(["touch", "/root/marker"])
    dry = nspawnctl(host, "apply", "--dry-run", FLEET, check=False)
    assert "~ b: " in dry.stdout
    assert "b is running and boots with what changed: it will be restarted" in dry.stdout
    assert "-b\n+bee\n" in dry.stdout  # the guest's /etc/hostname, as a diff
    assert "+hostname: bee" in dry.stdout
    assert changed_files(host, "/root/marker") == []
    assert ssh(host, 2302, "hostname").stdout.strip() == "b"


def test_apply_restarts_a_changed_running_container(host: TestHost) -> None:
    host.write_file(f"{FLEET}/b.yaml", yaml_for(2302, "hostname: bee\n"))
    before = ssh(host, 2302, "cat /proc/sys/kernel/random/boot_id").stdout
    result = nspawnctl(host, "apply", FLEET, check=False)
    assert "it will be restarted" in result.stdout
    assert "1 changed: b; 1 restarted: b" in result.stdout, result.stderr
    assert ssh(host, 2302, "hostname").stdout.strip() == "bee"
    assert ssh(host, 2302, "cat /proc/sys/kernel/random/boot_id").stdout != before
    # A stopped container is not booted by apply: it takes the change when it boots.
    host.write_file(f"{FLEET}/c.yaml", yaml_for(2303, "hostname: sea\n"))
    result = nspawnctl(host, "apply", FLEET, check=False)
    assert "1 changed: c" in result.stdout
    assert "restarted" not in result.stdout
    assert "c" not in machines(host)
    assert ssh(host, 2303, "hostname").stdout.strip() == "sea"


SECOND_KEY = "/root/.ssh/second"


def login_with(host: TestHost, key: str, port: int) -> str | None:
    """`hostname` over SSH with that key only; None if the login is refused."""
    argv = ssh_argv(port, "hostname")
    argv[argv.index(CLIENT_KEY)] = key
    out = host.run([*argv[:-2], "-o", "IdentitiesOnly=yes", *argv[-2:]], check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def test_a_key_added_in_the_guest_survives_an_unchanged_apply(host: TestHost) -> None:
    host.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", SECOND_KEY])
    ssh(host, 2301, "true")
    options = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    host.run(["ssh-copy-id", "-i", f"{SECOND_KEY}.pub", "-p", "2301", *options, "root@127.0.0.1"])
    running = leader(host, "a")
    assert running is not None
    result = nspawnctl(host, "apply", FLEET, check=False)
    assert "restarted" not in result.stdout
    assert leader(host, "a") == running  # not even power-cycled
    assert login_with(host, SECOND_KEY, 2301) == "a"
    # The YAML's keys are the YAML's: one taken out of it stops working; the user's stays.
    # sshd reads them at each connection: they change without a reboot.
    host.write_file(f"{FLEET}/a.yaml", yaml_for(2301).replace(CLIENT_KEY, SECOND_KEY))
    dry = nspawnctl(host, "apply", "--dry-run", FLEET, check=False).stdout
    assert "~ a: " in dry and "restart" not in dry
    nspawnctl(host, "apply", FLEET, check=False)
    assert login_with(host, CLIENT_KEY, 2301) is None
    assert login_with(host, SECOND_KEY, 2301) == "a"
    host.write_file(f"{FLEET}/a.yaml", yaml_for(2301))
    nspawnctl(host, "apply", FLEET, check=False)
    assert login_with(host, CLIENT_KEY, 2301) == "a"
    assert leader(host, "a") == running
    # The guest's root cannot change them: the host's file, bound read-only.
    tried = ssh(host, 2301, "echo x >> /etc/ssh/nspawnctl/authorized_keys.root", check=False)
    assert tried.returncode != 0 and "Read-only file system" in tried.stderr


def test_a_file_changed_in_the_guest_is_kept_until_the_yaml_changes_it(host: TestHost) -> None:
    ssh(host, 2301, "echo custom > /etc/hostname")  # what hostnamectl set-hostname writes
    dry = nspawnctl(host, "apply", "--dry-run", FLEET, check=False).stdout
    assert "~ a" not in dry
    assert "= a: changed in the guest, kept: /etc/hostname" in dry
    running = leader(host, "a")
    assert running is not None
    nspawnctl(host, "apply", FLEET, check=False)
    assert ssh(host, 2301, "cat /etc/hostname").stdout == "custom\n"
    assert leader(host, "a") == running
    # The YAML says something new for that file: the YAML wins.
    host.write_file(f"{FLEET}/a.yaml", yaml_for(2301, "hostname: ay\n"))
    nspawnctl(host, "apply", FLEET, check=False)
    assert ssh(host, 2301, "hostname").stdout.strip() == "ay"
    host.write_file(f"{FLEET}/a.yaml", yaml_for(2301))
    nspawnctl(host, "apply", FLEET, check=False)
    assert ssh(host, 2301, "hostname").stdout.strip() == "a"


def test_keys_an_older_nspawnctl_wrote_into_roots_file_are_taken_out(host: TestHost) -> None:
    # As an older nspawnctl left root's authorized_keys: its header and the YAML's key,
    # and below them a key the user added.
    ours = host.run(["cat", f"{CLIENT_KEY}.pub"]).stdout.strip()
    theirs = host.run(["cat", f"{SECOND_KEY}.pub"]).stdout.strip()
    header = f"# Generated by nspawnctl from {FLEET}/c.yaml; edit that file, not this one."
    ssh(host, 2303, f"printf '%s\\n' '{header}' '{ours}' '{theirs}' > /root/.ssh/authorized_keys")
    nspawnctl(host, "apply", FLEET, check=False)
    assert ssh(host, 2303, "cat /root/.ssh/authorized_keys").stdout == theirs + "\n"
    host.write_file(f"{FLEET}/c.yaml", yaml_for(2303).replace(CLIENT_KEY, SECOND_KEY))
    nspawnctl(host, "apply", FLEET, check=False)
    assert login_with(host, CLIENT_KEY, 2303) is None  # it was in the old file only
    host.write_file(f"{FLEET}/c.yaml", yaml_for(2303, "hostname: sea\n"))
    nspawnctl(host, "apply", FLEET, check=False)


def test_prune_removes_only_when_asked(host: TestHost) -> None:
    host.run(["rm", f"{FLEET}/d.yaml"])
    kept = nspawnctl(host, "apply", FLEET, check=False)
    assert "1 not in DIR (kept; --prune removes): d" in kept.stdout
    assert (
        host.run(["test", "-e", "/etc/systemd/system/nspawnctl-d.socket"], check=False).returncode
        == 0
    )
    pruned = nspawnctl(host, "apply", "--prune", FLEET, check=False)
    assert f"- d: not in {FLEET}" in pruned.stdout
    assert "1 removed: d" in pruned.stdout
    assert leftovers(host, "d") == []


def test_resources_are_the_units_properties_and_set_changes_them_live(host: TestHost) -> None:
    limits = "resources: {memory: 256M, tasks: 300, cpu: 20%, io_weight: 50}\n"
    host.write_file("/root/r.yaml", yaml_for(2310, limits))
    nspawnctl(host, "add", "r", "-f", "/root/r.yaml")
    unit = "systemd-nspawn@r.service"
    ssh(host, 2310, "true")  # boots it
    assert show(host, unit, "MemoryMax") == "268435456"
    assert show(host, unit, "TasksMax") == "300"
    assert show(host, unit, "CPUQuotaPerSecUSec") == "200ms"
    assert show(host, unit, "IOWeight") == "50"
    pid = show(host, unit, "MainPID")

    nspawnctl(host, "set", "r", "resources.memory=1G", "resources.tasks=")
    assert show(host, unit, "MainPID") == pid  # the same, running container
    assert show(host, unit, "MemoryMax") == str(1 << 30)
    assert show(host, unit, "TasksMax") == "16384"  # the stock unit's
    assert show(host, unit, "NeedDaemonReload") == "no"
    config = host.run(["cat", "/etc/nspawnctl/r.yaml"]).stdout
    assert "memory: 1G" in config
    assert "tasks" not in config
    control = host.run(["ls", "-A", "/run/systemd/system.control"], check=False).stdout
    assert "systemd-nspawn@r" not in control  # the drop-in holds the limits, nothing else
    status = json.loads(nspawnctl(host, "status", "r", "--json").stdout)
    assert status["limits"] == {
        "memory": 1 << 30,
        "cpu": 200_000,
        "tasks": 16384,  # the stock unit's own limit
        "io_weight": 50,
    }
    # An apply that changes only `resources:` takes the same live path.
    host.write_file("/etc/nspawnctl/r.yaml", config.replace("memory: 1G", "memory: 512M"))
    applied = nspawnctl(host, "apply", "/etc/nspawnctl").stdout
    assert "restart" not in applied, applied
    assert show(host, unit, "MainPID") == pid
    assert show(host, unit, "MemoryMax") == str(512 << 20)
    assert show(host, unit, "NeedDaemonReload") == "no"
    # Still true after the next boot: the drop-in was rewritten, not just the cgroup.
    nspawnctl(host, "restart", "r")
    assert show(host, unit, "MemoryMax") == str(512 << 20)
    assert show(host, unit, "TasksMax") == "16384"  # the stock unit's


def test_bad_limits_exit_2_and_change_nothing(host: TestHost) -> None:
    host.write_file("/root/neg.yaml", yaml_for(2311, "resources: {memory: -5}\n"))
    bad = nspawnctl(host, "add", "neg", "-f", "/root/neg.yaml", check=False)
    assert bad.returncode == 2
    assert "resources.memory: -5" in bad.stderr
    assert leftovers(host, "neg") == []

    before = host.run(["cat", "/etc/nspawnctl/r.yaml"]).stdout
    for assignment, message in (
        ("resources.memory=lots", "resources.memory: 'lots' is not a size"),
        ("resources.cpu=150", "resources.cpu: 150 is not a percentage"),
        ("resources.swap=1G", "only resources."),
        ("hostname=x", "only resources."),
    ):
        result = nspawnctl(host, "set", "r", assignment, check=False)
        assert result.returncode == 2, result
        assert message in result.stderr
    assert host.run(["cat", "/etc/nspawnctl/r.yaml"]).stdout == before
    assert show(host, "systemd-nspawn@r.service", "MemoryMax") == str(512 << 20)
