"""Fleet operations on real containers: `exec --all` / `exec NAME NAME -- CMD` run in
each (booting the stopped ones for it and powering them off again), and `which PID`
names the container of a process the host sees."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import CLIENT_KEY, nspawnctl
from tests.testhost import TestHost

NAMES = ("alpha", "beta", "gamma")
HOSTNAME = ["cat", "/etc/hostname"]


def machines(host: TestHost) -> list[str]:
    out = host.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def started_at(host: TestHost, name: str) -> str:
    """When the container's service last started (changes with every boot)."""
    unit = f"systemd-nspawn@{name}.service"
    return host.run(["systemctl", "show", "-P", "ExecMainStartTimestampMonotonic", unit]).stdout


def only_alpha_running(host: TestHost) -> None:
    nspawnctl(host, "start", "alpha")
    for name in NAMES[1:]:
        nspawnctl(host, "stop", name)
    assert machines(host) == ["alpha"]


def summary(stderr: str, label: str) -> str:
    """The summary line `nspawnctl: LABEL (N): ...` of an exec run."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"nspawnctl: {label}")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def fleet(host: TestHost) -> Iterator[tuple[str, ...]]:
    for port, name in enumerate(NAMES, start=2301):
        nspawnctl(host, "add", name, "--ssh", str(port), "--key", f"{CLIENT_KEY}.pub")
    yield NAMES


def test_exec_all_runs_everywhere_and_powers_off_what_it_booted(
    host: TestHost, fleet: tuple[str, ...]
) -> None:
    only_alpha_running(host)
    run = nspawnctl(host, "exec", "--all", "--", *HOSTNAME)
    assert sorted(run.stdout.splitlines()) == [f"{n}: {n}" for n in NAMES]
    assert summary(run.stderr, "succeeded") == "nspawnctl: succeeded (3): alpha, beta, gamma"
    assert (
        summary(run.stderr, "booted")
        == "nspawnctl: booted for it and powered off again: beta, gamma"
    )
    # Powered off by exec itself (stop jobs it waited for), the running one left running.
    assert machines(host) == ["alpha"]
    for name in ("beta", "gamma"):
        unit = f"systemd-nspawn@{name}.service"
        assert host.run(["systemctl", "is-active", unit], check=False).stdout.strip() == "inactive"
        assert host.run(["systemctl", "is-active", f"nspawnctl-{name}.socket"]).stdout == "active\n"


def test_jobs_bounds_how_many_run_at_once(host: TestHost, fleet: tuple[str, ...]) -> None:
    only_alpha_running(host)
    cursor = host.run(["journalctl", "-n", "0", "--show-cursor", "-q"]).stdout.split()[-1]
    nspawnctl(host, "exec", "--jobs", "1", "beta", "gamma", "--", *HOSTNAME)

    def events() -> list[str]:
        out = host.run(["journalctl", f"--after-cursor={cursor}", "-o", "cat", "_PID=1"]).stdout
        units = ("systemd-nspawn@beta.service", "systemd-nspawn@gamma.service")
        return [
            f"{line.split()[0]} {line.split()[1].split('@')[1].split('.')[0]}"
            for line in out.splitlines()
            if line.startswith(("Started ", "Stopped ")) and line.split()[1] in units
        ]

    host.wait_for(lambda: len(events()) == 4, timeout=30, what="4 start/stop messages")
    # One at a time: beta is powered off before gamma boots.
    assert events() == ["Started beta", "Stopped beta", "Started gamma", "Stopped gamma"]


def test_running_skips_stopped_containers(host: TestHost, fleet: tuple[str, ...]) -> None:
    only_alpha_running(host)
    before = {name: started_at(host, name) for name in NAMES}
    run = nspawnctl(host, "exec", "--all", "--running", "--", *HOSTNAME)
    assert run.stdout == "alpha: alpha\n"
    assert summary(run.stderr, "skipped") == (
        "nspawnctl: skipped (2): beta (not running), gamma (not running)"
    )
    assert "booted" not in run.stderr
    assert {name: started_at(host, name) for name in NAMES} == before  # none was booted
    assert machines(host) == ["alpha"]


def test_a_failure_in_one_container_exits_1_and_is_named(
    host: TestHost, fleet: tuple[str, ...]
) -> None:
    only_alpha_running(host)
    script = 'echo "on $(hostname)"; if [ "$(hostname)" = beta ]; then echo broken >&2; exit 3; fi'
    run = nspawnctl(host, "exec", "alpha", "beta", "--", "sh", "-c", script, check=False)
    assert run.returncode == 1, run.stderr
    assert sorted(run.stdout.splitlines()) == ["alpha: on alpha", "beta: on beta"]
    assert "beta: broken" in run.stderr.splitlines()
    assert summary(run.stderr, "failed") == "nspawnctl: failed (1): beta (exit code 3)"
    assert summary(run.stderr, "succeeded") == "nspawnctl: succeeded (1): alpha"
    assert machines(host) == ["alpha"]  # powered off again although its command failed


def test_a_broken_file_stops_no_other_container(host: TestHost, fleet: tuple[str, ...]) -> None:
    only_alpha_running(host)
    good = host.run(["cat", "/etc/nspawnctl/gamma.yaml"]).stdout
    host.write_file("/etc/nspawnctl/gamma.yaml", "image: [\n")  # installed, file broken
    host.write_file("/etc/nspawnctl/delta.yaml", "ssh: {listn: 2400}\n")  # never added
    try:
        assert nspawnctl(host, "list", check=False).returncode == 1  # list does mind
        run = nspawnctl(host, "exec", "--all", "--", *HOSTNAME)
    finally:
        host.write_file("/etc/nspawnctl/gamma.yaml", good)
        host.run(["rm", "/etc/nspawnctl/delta.yaml"])
    assert sorted(run.stdout.splitlines()) == [f"{n}: {n}" for n in NAMES]
    assert "delta (not installed" in summary(run.stderr, "skipped")


def test_unknown_name_runs_nothing(host: TestHost, fleet: tuple[str, ...]) -> None:
    only_alpha_running(host)
    run = nspawnctl(host, "exec", "alpha", "nosuch", "--", "touch", "/root/ran", check=False)
    assert run.returncode == 2
    assert "no container 'nosuch'" in run.stderr and "hint:" in run.stderr
    gone = nspawnctl(host, "exec", "alpha", "--", "test", "-e", "/root/ran", check=False)
    assert gone.returncode == 1


def test_exec_of_one_container_is_unchanged(host: TestHost, fleet: tuple[str, ...]) -> None:
    run = nspawnctl(host, "exec", "beta", "--", "sh", "-c", "hostname; exit 5", check=False)
    assert (run.returncode, run.stdout) == (5, "beta\n")  # no prefix, its own exit status
    assert nspawnctl(host, "exec", "beta", "hostname").stdout == "beta\n"  # `--` optional


def test_a_multi_line_script_that_reloads_systemd_ends(
    host: TestHost, fleet: tuple[str, ...]
) -> None:
    # The lines of the script must not end up in the transient unit's own file, where the
    # reload would read them back (RemainAfterExit=yes here: exec would never end).
    script = "\n".join(
        [
            "cat > /etc/systemd/system/oneshot.service <<EOF",
            "[Service]",
            "Type=oneshot",
            "RemainAfterExit=yes",
            "ExecStart=/bin/true",
            "EOF",
            "systemctl daemon-reload",
            "echo reloaded",
        ]
    )
    run = nspawnctl(host, "exec", "alpha", "--", "sh", "-c", script, timeout=60)
    assert run.stdout.strip() == "reloaded"


def test_which_names_the_container_of_a_guest_process(
    host: TestHost, fleet: tuple[str, ...]
) -> None:
    nspawnctl(host, "start", "gamma")
    # A process of the guest's own, found on the host: a unit its systemd runs.
    nspawnctl(host, "exec", "gamma", "--", "systemd-run", "--unit=marker", "sleep", "31337")
    try:
        # Type=simple: its start job may end before the exec.
        pgrep = ["pgrep", "-f", "^/usr/bin/sleep 31337$"]
        host.wait_for(
            lambda: host.run(pgrep, check=False).returncode == 0, timeout=30, what="the marker"
        )
        pids = host.run(pgrep).stdout.split()
        assert len(pids) == 1
        assert nspawnctl(host, "which", pids[0]).stdout == "gamma\n"
        leader = host.run(["machinectl", "show", "gamma", "--property=Leader", "--value"])
        assert nspawnctl(host, "which", leader.stdout.strip()).stdout == "gamma\n"
    finally:
        nspawnctl(host, "exec", "gamma", "--", "systemctl", "stop", "marker")


def test_which_of_a_host_process_or_none(host: TestHost, fleet: tuple[str, ...]) -> None:
    nspawnctl(host, "start", "alpha")  # a container runs, and still these are not its
    journald = host.run(["pgrep", "-x", "-o", "systemd-journal"]).stdout.strip()
    for pid in ("1", journald):
        run = nspawnctl(host, "which", pid, check=False)
        assert (run.returncode, run.stdout) == (1, ""), run.stderr
        assert f"process {pid} belongs to the host, not to a container" in run.stderr
    pid_max = int(host.run(["cat", "/proc/sys/kernel/pid_max"]).stdout)
    missing = str(pid_max - 1)
    assert host.run(["test", "-e", f"/proc/{missing}"], check=False).returncode == 1
    run = nspawnctl(host, "which", missing, check=False)
    assert (run.returncode, run.stdout) == (2, "")
    assert f"no process {missing}" in run.stderr and "hint:" in run.stderr
