"""Under load, with real clients: a port checker's storm of connect-and-close calls
never wedges the guest's SSH socket, a hundred SSH sessions at once (more than
systemd's default MaxConnections=64) are all served, and so is the first connection to
each of many stopped containers at once (as after a host's reboot)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.integration.conftest import CLIENT_KEY, nspawnctl, ssh, ssh_argv
from tests.integration.test_core import machines
from tests.testhost import TestHost

PORT = 2701
SESSIONS = 100
BURST_PORTS = range(2710, 2718)

# The first connection to each port at once, each waiting for its SSH banner; prints
# "PORT RESULT SECONDS" per port (RESULT: served, or how it was lost). bench.cold_burst
# fires it too.
BURST = """
import socket, sys, time
from concurrent.futures import ThreadPoolExecutor
ports = [int(p) for p in sys.argv[1:]]
def first(port):
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=150) as s:
            s.settimeout(150)
            result = "served" if s.recv(64).startswith(b"SSH-2.0") else "no-banner"
    except OSError as e:
        result = type(e).__name__
    return port, result, time.monotonic() - start
with ThreadPoolExecutor(len(ports)) as pool:
    for port, result, seconds in pool.map(first, ports):
        print(port, result, f"{seconds:.3f}")
"""


@pytest.fixture(scope="module")
def busy(host: TestHost) -> Iterator[str]:
    host.write_file(
        "/var/tmp/busy.yaml", f"ssh: {{listen: {PORT}, authorized_keys: [{CLIENT_KEY}.pub]}}"
    )
    nspawnctl(host, "add", "busy", "-f", "/var/tmp/busy.yaml")
    ssh(host, PORT, "true")
    yield "busy"
    nspawnctl(host, "remove", "busy")


def guest_socket_state(host: TestHost) -> str:
    argv = ["systemctl", "show", "--property=ActiveState,Result", "sshd.socket"]
    return nspawnctl(host, "exec", "busy", "--", *argv).stdout


def test_a_port_checker_storm_does_not_wedge_ssh(host: TestHost, busy: str) -> None:
    # What a health check or a port scan does, as fast as it can: ~210 of these put
    # the guest's sshd.socket into "failed (trigger-limit-hit)" for good.
    storm = (
        "import socket\n"
        "for _ in range(500):\n"
        f"    socket.create_connection(('127.0.0.1', {PORT}), timeout=30).close()\n"
    )
    host.run(["python3", "-c", storm], timeout=300)
    assert "ActiveState=active" in guest_socket_state(host)
    assert "Result=success" in guest_socket_state(host)
    assert ssh(host, PORT, "echo served").stdout.strip() == "served"


def test_a_hundred_ssh_sessions_at_once_are_all_served(host: TestHost, busy: str) -> None:
    # Each session stays open long enough for all of them to overlap (logins take
    # well under a second of CPU each); curve25519 spares the clients' own CPU.
    command = "sleep 10; echo served"
    argv = ssh_argv(PORT, command)
    argv[1:1] = ["-o", "KexAlgorithms=curve25519-sha256"]
    clients = [
        host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(SESSIONS)
    ]
    results = [client.communicate(timeout=180) for client in clients]
    served = sum(out.strip() == "served" for out, _err in results)
    failures = {err.strip() for out, err in results if out.strip() != "served"}
    assert served == SESSIONS, failures


def test_first_connections_to_many_stopped_containers_at_once_are_all_served(
    host: TestHost,
) -> None:
    names = [f"burst{i}" for i in range(len(BURST_PORTS))]
    for name, port in zip(names, BURST_PORTS, strict=True):
        host.write_file(
            f"/var/tmp/{name}.yaml",
            f"ssh: {{listen: {port}, authorized_keys: [{CLIENT_KEY}.pub]}}",
        )
        nspawnctl(host, "add", name, "-f", f"/var/tmp/{name}.yaml")
    assert not set(names) & set(machines(host))
    # The inotify limit a burst needs is kept where the host's boot reads it (here,
    # in a container host, /proc/sys is read-only: it cannot be raised at once).
    read_at_boot = host.run(["/usr/lib/systemd/systemd-sysctl", "--cat-config"]).stdout
    assert "# /etc/sysctl.d/60-nspawnctl.conf\n" in read_at_boot
    assert "\nfs.inotify.max_user_instances = 8192\n" in read_at_boot
    out = host.run(["python3", "-c", BURST, *map(str, BURST_PORTS)], timeout=300).stdout
    results = [line.split()[1] for line in out.splitlines()]
    assert results == ["served"] * len(names), out
    # And stopped all at once: every one powers off.
    stops = [host.popen([sys.executable, "-m", "nspawnctl", "stop", n]) for n in names]
    assert [stop.wait(timeout=180) for stop in stops] == [0] * len(names)
    assert not set(names) & set(machines(host))


DEAF_PORT = 2720
# A client that connects and then waits for the server's first byte, for as long as
# the test lets it.
HOLD = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=300) as s:
    print("connected", flush=True)
    s.recv(1)
"""


def test_status_says_when_connections_wait_that_the_guest_takes_no_more(host: TestHost) -> None:
    """A guest that stops its own sshd.socket takes no connection any more, though its
    container runs: they wait in the host's socket. `status` counts them from the
    kernel's queue, and says so."""
    host.write_file(
        "/var/tmp/deaf.yaml", f"ssh: {{listen: {DEAF_PORT}, authorized_keys: [{CLIENT_KEY}.pub]}}"
    )
    nspawnctl(host, "add", "deaf", "-f", "/var/tmp/deaf.yaml")
    ssh(host, DEAF_PORT, "true")  # boots it
    assert "problem" not in nspawnctl(host, "status", "deaf").stdout
    nspawnctl(host, "exec", "deaf", "--", "systemctl", "stop", "sshd.socket")
    client = host.popen([sys.executable, "-c", HOLD, str(DEAF_PORT)], stdout=subprocess.PIPE)
    try:
        assert client.stdout is not None and client.stdout.readline() == "connected\n"
        report = nspawnctl(host, "status", "deaf").stdout
        assert f"connections wait in the host's queue (1 on {DEAF_PORT})" in report, report
        status = json.loads(nspawnctl(host, "status", "deaf", "--json").stdout)
        assert status["waiting"] == {str(DEAF_PORT): 1}
        assert status["container"]["state"] == "running"
    finally:
        client.kill()
        client.wait()
    # A restart gives the guest the socket again.
    nspawnctl(host, "restart", "deaf")
    assert ssh(host, DEAF_PORT, "hostname").stdout.strip() == "deaf"
    assert "problem" not in nspawnctl(host, "status", "deaf").stdout
    nspawnctl(host, "remove", "deaf")
