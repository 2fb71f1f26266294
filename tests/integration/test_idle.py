"""Scale to zero on real systemd: idle containers power themselves off and their
sockets keep listening; nothing is powered off under a connection or a keep-awake
unit; no connection is lost to a power-off; cycling never closes the port."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE

import pytest

from tests.integration.conftest import CLIENT_KEY, booted_host, nspawnctl, ssh
from tests.integration.test_network import ECHO_UNITS
from tests.testhost import TestHost


def yaml(port: int, idle: str, extra: str = "") -> str:
    return (
        f"ssh: {{listen: {port}, authorized_keys: [{CLIENT_KEY}.pub]}}\n"
        f"idle_timeout: {idle}\n{extra}"
    )


@pytest.fixture(scope="module")
def host(image_cache: Path) -> Iterator[TestHost]:
    with booted_host(image_cache) as h:
        yield h


def add(host: TestHost, name: str, text: str) -> None:
    host.write_file(f"/etc/nspawnctl/{name}.yaml", text)
    nspawnctl(host, "add", name)


def leader(host: TestHost, name: str) -> str | None:
    out = host.run(["machinectl", "show", "--property=Leader", "--value", name], check=False)
    return out.stdout.strip() or None


def powered_off(host: TestHost, name: str) -> bool:
    """Its unit has ended, its last commands (ExecStopPost=) included; the machine is
    gone from machined a moment before that."""
    unit = f"systemd-nspawn@{name}.service"
    out = host.run(["systemctl", "show", "-P", "ActiveState", unit])
    return out.stdout.strip() in ("inactive", "failed")


def socket_listening(host: TestHost, name: str) -> bool:
    out = host.run(["systemctl", "show", "-P", "SubState", f"nspawnctl-{name}.socket"])
    return out.stdout.strip() == "listening"


def test_idle_container_powers_off_and_comes_back(host: TestHost) -> None:
    add(host, "idle1", yaml(2601, "20s"))
    assert ssh(host, 2601, "hostname").stdout.strip() == "idle1"
    host.wait_for(
        lambda: powered_off(host, "idle1"),
        timeout=60,
        what="idle1 powered off after its last SSH session",
    )
    assert socket_listening(host, "idle1")
    log = nspawnctl(host, "logs", "idle1", "-n", "500").stdout
    assert "idle for 20 s: powering off" in log
    assert ssh(host, 2601, "hostname").stdout.strip() == "idle1"


def test_open_session_keeps_it_awake(host: TestHost) -> None:
    add(host, "idle2", yaml(2602, "10s"))
    # Longer than the idle timeout plus the checks' period: a power-off would cut it.
    out = ssh(host, 2602, "sleep 25; echo still-here").stdout
    assert out.strip() == "still-here"


# One connection to a native Accept=yes echo service, held open until told on stdin: a
# power-off in between would reset it.
HELD_ECHO = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=90) as s:
    s.sendall(b"before\\n")
    print(s.recv(100).decode().strip(), flush=True)
    sys.stdin.readline()
    s.sendall(b"after\\n")
    print(s.recv(100).decode().strip())
"""


def idle_checked_since(host: TestHost, name: str, since: float) -> bool:
    """Whether the guest's idle check has run to its end at or after `since` (the
    CLOCK_MONOTONIC that host, guest and this process share), or the guest is gone."""
    out = host.run(
        [
            "systemctl",
            f"--machine={name}",
            "show",
            "--property=ExecMainExitTimestampMonotonic",
            "--value",
            "nspawnctl-idle.service",
        ],
        check=False,
    )
    if out.returncode:
        return leader(host, name) is None
    return int(out.stdout.strip() or 0) / 1e6 >= since


def test_open_connection_to_a_native_socket_keeps_it_awake(host: TestHost) -> None:
    add(host, "idle5", yaml(2608, "10s", "sockets:\n  - {listen: 2609, native: echo.socket}\n"))
    nspawnctl(host, "exec", "idle5", "--", "sh", "-c", ECHO_UNITS)
    nspawnctl(host, "stop", "idle5")  # the next boot takes port 2609 with echo.socket
    client = host.popen([sys.executable, "-c", HELD_ECHO, "2609"], stdin=PIPE, stdout=PIPE)
    assert client.stdout is not None and client.stdout.readline().strip() == "before"
    # Held past the idle timeout (10 s) plus the checks' period (2 s) and one more check.
    opened = time.monotonic()
    host.wait_for(
        lambda: idle_checked_since(host, "idle5", opened + 14),
        timeout=90,
        what="idle5's idle check 14 s after the connection opened",
        interval=0.5,
    )
    out, _ = client.communicate("go\n", timeout=60)
    assert out.split() == ["after"]


def test_keep_awake_unit_keeps_it_awake(host: TestHost) -> None:
    add(host, "idle3", yaml(2603, "10s", "keep_awake: [batch.service]\n"))
    ssh(host, 2603, "systemd-run --unit=batch sleep 25")
    host.wait_for(
        lambda: leader(host, "idle3") is None,
        timeout=90,
        what="idle3 powered off after its batch job",
    )
    log = nspawnctl(host, "logs", "idle3", "-o", "short-unix", "-n", "500").stdout
    [done] = [ln for ln in log.splitlines() if "batch.service: Deactivated" in ln]
    [off] = [ln for ln in log.splitlines() if "powering off" in ln]
    assert float(off.split()[0]) >= float(done.split()[0]) + 10


# Connects every PAUSE seconds for as long as it takes to see `cycles` power-offs; every
# connection must get its SSH banner: a reset or a timeout counts as lost.
CHURN = """
import socket, subprocess, sys, time
port, name, cycles, pause = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
leaders, lost, served, deadline = set(), [], 0, time.monotonic() + 240
def leader():
    r = subprocess.run(["machinectl", "show", "--property=Leader", "--value", name],
                       capture_output=True, text=True)
    return r.stdout.strip()
while len(leaders) <= cycles and time.monotonic() < deadline:
    client = "?"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            client = s.getsockname()[1]
            s.settimeout(30)
            if not s.recv(64).startswith(b"SSH-2.0"):
                lost.append(f"no-banner@{time.time():.3f}:{client}")
            else:
                served += 1
    except OSError as e:
        lost.append(f"{type(e).__name__}@{time.time():.3f}:{client}")
    if leader():
        leaders.add(leader())
    time.sleep(pause)
print(len(leaders), served, " ".join(lost) or "none")
"""


# One connection that must get its SSH banner; prints "served", or how it was lost (a
# reset, a timeout).
BANNER = """
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60) as s:
        s.settimeout(60)
        print("served" if s.recv(64).startswith(b"SSH-2.0") else "no-banner")
except OSError as e:
    print(type(e).__name__)
"""


def banner(host: TestHost, port: int) -> str:
    return host.run([sys.executable, "-c", BANNER, str(port)]).stdout.strip()


def off_or_going(host: TestHost, name: str, booted: str) -> bool:
    """Whether the boot whose leader is `booted` is powering itself off (slow-stop below
    marks it in the guest's /run), or is gone already."""
    mark = f"/proc/{booted}/root/run/powering-off"
    return host.run(["test", "-e", mark], check=False).returncode == 0 or (
        leader(host, name) != booted
    )


# A service that takes 3 s to stop, as a database flushing would: every power-off then
# has a window that the test below cannot miss.
SLOW_STOP = (
    "printf '[Service]\\nType=oneshot\\nRemainAfterExit=yes\\nExecStart=/bin/true\\n"
    "ExecStop=/bin/touch /run/powering-off\\nExecStop=/bin/sleep 3\\n"
    "[Install]\\nWantedBy=multi-user.target\\n' "
    "> /etc/systemd/system/slow-stop.service && systemctl enable --now slow-stop.service"
)


def test_no_connection_is_lost_to_idle_power_offs(host: TestHost) -> None:
    add(host, "churn", yaml(2604, "10s"))
    nspawnctl(host, "exec", "churn", "--", "sh", "-c", SLOW_STOP)
    # Each cycle connects (which boots the guest if it is down), waits without a
    # connection until the guest powers itself off, and connects again at once: that
    # connection arrives while the power-off is under way, and the next boot serves it.
    results: list[str] = []
    boots: set[str | None] = set()
    during = 0
    for _ in range(3):
        results.append(banner(host, 2604))
        booted = leader(host, "churn")
        assert booted is not None
        boots.add(booted)
        host.wait_for(
            functools.partial(off_or_going, host, "churn", booted),
            timeout=90,
            what="churn powering itself off",
            interval=0.05,
        )
        during += leader(host, "churn") == booted  # still that boot: it is powering off
        results.append(banner(host, 2604))
    boots.add(leader(host, "churn"))
    print(f"churn: {during} connections during a power-off, {len(boots)} boots: {results}")
    assert results == ["served"] * 6
    assert during == 3, "every cycle reached a power-off"
    assert len(boots) == 4, "each connection during a power-off was served by a new boot"


@pytest.mark.xfail(
    strict=False,
    reason="known, cause not found: in CI only (2 runs of the last 2, never in 34 runs here, "
    "alone or under load), one connection of the churn was closed without a banner. "
    "On failure the test prints each lost connection's client port and the journal of "
    "the stops around it; see RELIABILITY, Not guaranteed, in nspawnctl(1)",
)
def test_connections_during_a_stop_wait_for_the_next_boot(host: TestHost) -> None:
    add(host, "stopper", yaml(2605, "1h"))
    client = host.popen(
        [sys.executable, "-c", CHURN, "2605", "stopper", "3", "0.05"], stdout=-1, stderr=-1
    )
    for _ in range(3):
        # Booted, not merely registered: systemd skips ExecStop= (the quiesce) when it
        # stops a unit that is still starting, so a stop during the boot is another case
        # (see the note of issue 7), not the one this test is about.
        host.wait_for(
            lambda: (
                host.run(
                    ["systemctl", "is-active", "-q", "systemd-nspawn@stopper.service"], check=False
                ).returncode
                == 0
            ),
            timeout=60,
            what="booted",
        )
        nspawnctl(host, "stop", "stopper")
    out, _err = client.communicate(timeout=300)
    boots, _served, lost = out.split(maxsplit=2)
    if lost.strip() != "none":
        # Each lost connection by its client port, and the whole stop it fell in.
        ports = "|".join(item.rpartition(":")[2] for item in lost.split())
        journal = host.run(
            [
                "sh",
                "-c",
                "journalctl -m --no-pager -o short-precise | grep -E "
                "'sshd|quiesce|nspawn|stopper|Shutting|Stopping|Stopped|Start|"
                f"{ports}' | grep -vE 'modprobe|pam_|skipped because'",
            ]
        )
        pytest.fail(f"lost: {lost}\n{journal.stdout[-30000:]}")
    assert int(boots) >= 3


def test_cycling_never_closes_the_port(host: TestHost) -> None:
    add(host, "cycle", yaml(2606, "1h"))
    for _ in range(8):
        assert ssh(host, 2606, "hostname").stdout.strip() == "cycle"
        nspawnctl(host, "stop", "cycle")
    assert socket_listening(host, "cycle")
    assert ssh(host, 2606, "hostname").stdout.strip() == "cycle"


def test_status_says_when_systemd_gave_up_and_start_recovers(host: TestHost) -> None:
    add(host, "broken", yaml(2607, "1h"))
    # Break its root: every boot now fails, and a pending connection retries until
    # the socket's trigger limit makes systemd give up.
    host.run(["mv", "/var/lib/nspawnctl/layers/broken/work", "/var/tmp/broken-work"])
    host.run(
        [
            sys.executable,
            "-c",
            "import socket; s = socket.create_connection("
            "('127.0.0.1', 2607)); s.settimeout(5); s.recv(1) if False else None",
        ],
        check=False,
    )
    # Failed, not merely not listening: the socket is "running" while a boot is tried.
    host.wait_for(
        lambda: (
            host.run(
                ["systemctl", "is-failed", "-q", "nspawnctl-broken.socket"], check=False
            ).returncode
            == 0
        ),
        timeout=60,
        what="systemd giving up on broken",
    )
    status = nspawnctl(host, "status", "broken").stdout
    assert "systemd gave up on" in status and "nspawnctl start broken" in status
    host.run(["mv", "/var/tmp/broken-work", "/var/lib/nspawnctl/layers/broken/work"])
    nspawnctl(host, "start", "broken")
    assert socket_listening(host, "broken") or leader(host, "broken")
    assert ssh(host, 2607, "hostname").stdout.strip() == "broken"
