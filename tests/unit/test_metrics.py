"""Metrics as pure logic: the events a container's unit records, counted and folded; the
exposition read back by Prometheus's own parser; the HTTP answer; the cgroup files; top's
table. The real thing (units recording, a scrape over a socket) is in
tests/integration/test_metrics.py."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nspawnctl import events
from nspawnctl.cgroup import Usage, usage
from nspawnctl.commands.metrics import _Handler, formatted, table
from nspawnctl.errors import UsageError
from nspawnctl.events import BOOT_BUCKETS, Counts, read_counts, record_command
from nspawnctl.listen import Listen
from nspawnctl.metrics import FAMILIES, STATES, Sample, exposition
from nspawnctl.paths import Paths
from nspawnctl.render import render_metrics_units


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths.from_env({"NSPAWNCTL_STATE_DIR": str(tmp_path / "state")})


def counted(*lines: str) -> Counts:
    counts = Counts()
    for line in lines:
        counts = counts.after(line)
    return counts


def test_a_boot_a_stop_and_an_idle_power_off_are_counted_apart() -> None:
    counts = counted(
        "start 100.00",
        "ready 100.30",
        "stop 150.00",
        "end 151.00 success 0",  # the host stopped it
        "start 200.00",
        "ready 202.00",
        "end 900.00 success 0",  # it powered itself off
        "start 1000.00",
        "end 1010.00 exit-code 1",  # a boot that failed
        "start 1100.00",
        "ready 1100.05",
        "end 1200.00 success 133",  # it rebooted itself
    )
    assert counts.starts == 4
    assert counts.boots == 3
    assert counts.boot_seconds_sum == pytest.approx(0.3 + 2.0 + 0.05)
    assert counts.boot_buckets[BOOT_BUCKETS.index(0.5)] == 1
    assert counts.boot_buckets[BOOT_BUCKETS.index(2.5)] == 1
    assert counts.boot_buckets[BOOT_BUCKETS.index(0.1)] == 1
    assert (counts.guest_poweroffs, counts.reboots, counts.failures) == (1, 1, 1)


def test_lines_it_did_not_write_change_nothing() -> None:
    before = counted("start 1.0")
    assert counted("start 1.0", "ready", "end", "start x", "what 1", "total {bad") == before


def test_the_recording_command_appends_a_line_as_systemd_would_run_it(paths: Paths) -> None:
    command = record_command(paths, "web", "end $SERVICE_RESULT $EXIT_STATUS")
    assert command.startswith('/bin/sh -c "') and command.endswith('"')
    # What systemd hands sh: its quoting undone, `$$` back to `$`.
    script = command[len('/bin/sh -c "') : -1].replace('\\"', '"').replace("$$", "$")
    env = {"SERVICE_RESULT": "success", "EXIT_STATUS": "0", "PATH": "/usr/bin:/bin"}
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True)
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True)
    lines = events.events_file(paths, "web").read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[0] == "end" and lines[0].split()[2:] == ["success", "0"]


def test_a_long_file_is_folded_into_one_line_and_counts_the_same(paths: Paths) -> None:
    file = events.events_file(paths, "web")
    file.parent.mkdir(parents=True)
    boots = ["start 10.0", "ready 10.2", "end 20.0 success 0"] * 1000
    file.write_text("\n".join([*boots, "start 30.0"]) + "\n")
    unfolded = read_counts(paths, "web", fold=False)
    folded = read_counts(paths, "web")
    assert unfolded is not None and folded == unfolded
    assert unfolded.starts == 1001 and unfolded.guest_poweroffs == 1000
    assert len(file.read_text().splitlines()) == 1
    # The boot in progress goes on after the fold.
    with file.open("a") as f:
        f.write("ready 30.4\n")
    assert read_counts(paths, "web") == Counts(
        starts=1001,
        boot_seconds_sum=pytest.approx(1000 * 0.2 + 0.4),  # type: ignore[arg-type]
        boot_buckets=(0, 1000, 1, *[0] * (len(BOOT_BUCKETS) - 2)),  # 0.2 s; 0.4 s
        guest_poweroffs=1000,
    )


def test_counts_a_user_cannot_read_are_left_out_not_zero(paths: Paths) -> None:
    file = events.events_file(paths, "web")
    file.parent.mkdir(parents=True)
    file.mkdir()  # unreadable as a file, as root's 0700 directory is to a user
    assert read_counts(paths, "web") is None
    assert read_counts(paths, "never-booted") == Counts()
    text = exposition([sample("web", counts=None)], 0)
    assert "nspawnctl_container_cold_starts_total{" not in text
    assert 'nspawnctl_container_state{container="web",state="running"} 1' in text


def sample(name: str, **changes: object) -> Sample:
    values: dict[str, object] = {
        "name": name,
        "state": "running",
        "socket_failed": False,
        "connections": 2,
        "waiting": 0,
        "counts": counted("start 1.0", "ready 1.3"),
        "usage": Usage(memory_bytes=10 << 20, cpu_seconds=1.5, tasks=7),
    }
    values.update(changes)
    return Sample(**values)  # type: ignore[arg-type]


def test_prometheus_reads_every_line_and_every_family_is_declared() -> None:
    text = exposition([sample("web"), sample("db", state="stopped", usage=Usage())], 1)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The parser drops _total from a counter's family name.
    declared = {name.removesuffix("_total") for name in FAMILIES}
    assert set(families) == declared
    state = {
        (s.labels["container"], s.labels["state"]): s.value
        for s in families["nspawnctl_container_state"].samples
    }
    assert state[("web", "running")] == 1 and state[("db", "stopped")] == 1
    assert sum(v for (c, _s), v in state.items() if c == "db") == 1
    assert set(s for _c, s in state) == set(STATES)
    boot = {
        (s.name, s.labels.get("le")): s.value
        for s in families["nspawnctl_container_boot_seconds"].samples
        if s.labels["container"] == "web"
    }
    assert boot[("nspawnctl_container_boot_seconds_bucket", "0.25")] == 0
    assert boot[("nspawnctl_container_boot_seconds_bucket", "0.5")] == 1
    assert boot[("nspawnctl_container_boot_seconds_bucket", "+Inf")] == 1
    assert boot[("nspawnctl_container_boot_seconds_count", None)] == 1
    # Not counted on this host: no sample, rather than a zero.
    memory = families["nspawnctl_container_memory_bytes"].samples
    assert [s.labels["container"] for s in memory] == ["web"]


def test_a_name_is_escaped_in_its_label() -> None:
    text = exposition([sample('we"b\\x')], 0)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (up,) = families["nspawnctl_container_socket_failed"].samples
    assert up.labels["container"] == 'we"b\\x'


def serve(paths: Paths, request: bytes) -> bytes:
    """One connection through the endpoint's handler, as systemd hands it over."""
    ours, theirs = socket.socketpair()
    handler = type("Handler", (_Handler,), {"paths": paths})

    def answer_one() -> None:
        handler(ours, ("", 0), None)
        ours.shutdown(socket.SHUT_RDWR)  # as the service's end: the scraper sees EOF

    thread = threading.Thread(target=answer_one)
    thread.start()
    theirs.sendall(request)
    answer = b""
    while chunk := theirs.recv(65536):
        answer += chunk
    thread.join(timeout=30)
    ours.close()
    theirs.close()
    return answer


def test_http_answers_a_scrape_and_refuses_other_paths(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("nspawnctl.commands.metrics.collect", lambda _paths: ([sample("web")], []))
    answer = serve(paths, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _sep, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"text/plain; version=0.0.4" in head
    assert list(text_string_to_metric_families(body.decode()))
    assert serve(paths, b"GET /etc/shadow HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404")
    # Not HTTP (a TLS hello): an error page, no metrics.
    assert b"400" in serve(paths, b"\x16\x03\x01 garbage\r\n\r\n")


def test_cgroup_files_are_read_and_what_is_missing_is_none(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids io\n")
    group = tmp_path / "machine.slice" / "systemd-nspawn@web.service"
    group.mkdir(parents=True)
    (group / "memory.current").write_text("1048576\n")
    (group / "memory.max").write_text("max\n")
    (group / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\n")
    (group / "pids.current").write_text("12\n")
    (group / "io.stat").write_text("8:0 rbytes=100 wbytes=50 rios=1\n8:16 rbytes=1 wbytes=2\n")
    assert usage("web", tmp_path) == Usage(1048576, None, 2.5, 12, 101, 52)
    assert usage("db", tmp_path) == Usage()


def test_top_shows_rates_busiest_first_and_dashes_for_what_is_not_counted() -> None:
    before = [sample("web"), sample("db"), sample("off", state="stopped", usage=Usage())]
    now = [
        sample("web", usage=Usage(cpu_seconds=2.0, memory_bytes=1 << 20)),
        sample("db", usage=Usage(cpu_seconds=2.5)),
        sample("off", state="stopped", usage=Usage()),
    ]
    rows = table(now, before, 2.0)
    assert [row[0] for row in rows] == ["NAME", "db", "web", "off"]
    assert rows[1][2] == "50.0" and rows[2][2] == "25.0" and rows[3][2] == "-"
    assert rows[2][3] == "1.0M"
    lines = formatted(rows)
    assert len({line.index("STATE") for line in lines[:1]}) == 1
    assert "\x1b" not in "".join(formatted(table([sample("\x1b[2Jx")], [], 1.0)))


def test_the_endpoint_units_name_the_address_and_the_locations_in_use(tmp_path: Path) -> None:
    paths = Paths.from_env({"NSPAWNCTL_STATE_DIR": str(tmp_path / "state")})
    socket_unit, service = render_metrics_units(paths, Listen.parse("[::1]:9900"))
    assert socket_unit.path.name == "nspawnctl-metrics.socket"
    assert "\nListenStream=[::1]:9900\n" in socket_unit.text
    assert service.path.name == "nspawnctl-metrics@.service"
    assert f'Environment="NSPAWNCTL_STATE_DIR={tmp_path}/state"' in service.text
    assert f"ReadWritePaths=-{tmp_path}/state/events" in service.text
    assert " -m nspawnctl metrics --http\n" in service.text


def test_a_location_a_unit_cannot_name_is_refused(tmp_path: Path) -> None:
    paths = Paths.from_env({"NSPAWNCTL_STATE_DIR": str(tmp_path / "50%")})
    with pytest.raises(UsageError, match="cannot be named in a unit file"):
        render_metrics_units(paths, Listen.parse("9900"))
