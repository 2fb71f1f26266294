"""Metrics on real systemd: the container's unit records its boots and power-offs, the
endpoint is socket-activated and scraped over HTTP, Prometheus's parser reads every
line, and `top` refreshes in place on a terminal (tmux) and prints plain text to a pipe."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import booted_host, nspawnctl, ssh, ssh_argv
from tests.integration.test_idle import add, powered_off, yaml
from tests.testhost import TestHost

ENDPOINT = "127.0.0.1:9847"

SCRAPE = """
import sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=60) as answer:
    print(answer.headers["Content-Type"], file=sys.stderr)
    sys.stdout.write(answer.read().decode())
"""


@pytest.fixture(scope="module")
def host(image_cache: Path) -> Iterator[TestHost]:
    with booted_host(image_cache) as h:
        yield h


def scrape(host: TestHost) -> dict[tuple[str, str], float]:
    """Every sample of the endpoint, parsed as Prometheus parses it: (name, container)
    -> value, for the samples with no label but `container`."""
    out = host.run([sys.executable, "-c", SCRAPE, ENDPOINT])
    assert out.stderr.startswith("text/plain; version=0.0.4")
    values = {}
    for family in text_string_to_metric_families(out.stdout):
        for sample in family.samples:
            if set(sample.labels) <= {"container"}:
                values[(sample.name, sample.labels.get("container", ""))] = sample.value
    return values


def test_a_cold_start_and_an_idle_power_off_move_their_counters_by_one(host: TestHost) -> None:
    add(host, "counted", yaml(2701, "10s"))
    nspawnctl(host, "metrics", "--enable", "--listen", ENDPOINT)
    # Socket-activated: nothing serves it until a scraper connects.
    out = host.run(["systemctl", "show", "-P", "SubState", "nspawnctl-metrics.socket"])
    assert out.stdout.strip() == "listening"
    before = scrape(host)
    assert before[("nspawnctl_containers", "")] == 1
    assert ssh(host, 2701, "hostname").stdout.strip() == "counted"
    host.wait_for(lambda: powered_off(host, "counted"), timeout=90, what="counted powered off idle")
    after = scrape(host)

    def moved(name: str) -> float:
        return after[(name, "counted")] - before.get((name, "counted"), 0)

    assert moved("nspawnctl_container_cold_starts_total") == 1
    assert moved("nspawnctl_container_idle_poweroffs_total") == 1
    assert moved("nspawnctl_container_boot_seconds_count") == 1
    assert 0 < after[("nspawnctl_container_boot_seconds_sum", "counted")] < 120
    assert moved("nspawnctl_container_failures_total") == 0
    # A stop by the host is not the guest's own power-off.
    ssh(host, 2701, "true")
    nspawnctl(host, "stop", "counted")
    last = scrape(host)
    assert last[("nspawnctl_container_cold_starts_total", "counted")] == (
        after[("nspawnctl_container_cold_starts_total", "counted")] + 1
    )
    assert (
        last[("nspawnctl_container_idle_poweroffs_total", "counted")]
        == (after[("nspawnctl_container_idle_poweroffs_total", "counted")])
    )
    # The same figures on standard output, without the endpoint.
    printed = nspawnctl(host, "metrics").stdout
    assert 'nspawnctl_container_cold_starts_total{container="counted"} 2' in printed


def test_a_running_container_shows_its_connections_and_cpu(host: TestHost) -> None:
    add(host, "busy", yaml(2702, "1h"))
    session = host.popen(ssh_argv(2702, "sleep 60"), stdout=-1)
    try:
        host.wait_for(
            lambda: scrape(host).get(("nspawnctl_container_connections", "busy"), 0) >= 1,
            timeout=60,
            what="the SSH session counted",
        )
        values = scrape(host)
        assert values[("nspawnctl_container_socket_failed", "busy")] == 0
        # CPU time is counted even on a hybrid host (cpu.stat of the unified tree).
        assert values[("nspawnctl_container_cpu_seconds_total", "busy")] > 0
    finally:
        session.kill()
        session.wait()


def test_the_endpoint_goes_away_with_disable(host: TestHost) -> None:
    nspawnctl(host, "metrics", "--enable", "--listen", ENDPOINT)
    nspawnctl(host, "metrics", "--disable")
    out = host.run(["systemctl", "show", "-P", "LoadState", "nspawnctl-metrics.socket"])
    assert out.stdout.strip() == "not-found"
    assert not host.run(["ss", "-Hltn", f"sport = :{ENDPOINT.rpartition(':')[2]}"]).stdout


def pane(host: TestHost) -> str:
    return host.run(["tmux", "capture-pane", "-p", "-t", "top"], check=False).stdout


def test_top_refreshes_in_place_on_a_terminal_and_is_plain_in_a_pipe(host: TestHost) -> None:
    add(host, "watched", yaml(2703, "1h"))
    command = f"{sys.executable} -m nspawnctl top --delay 0.5"
    host.run(["tmux", "new-session", "-d", "-s", "top", "-x", "160", "-y", "40", command])
    try:
        host.wait_for(lambda: "watched" in pane(host), timeout=30, what="top's first table")
        first = pane(host).splitlines()[0]
        assert first.startswith("nspawnctl top - ")
        # In place: the header stays on the first line while its clock moves on.
        host.wait_for(
            lambda: pane(host).splitlines()[0] not in ("", first),
            timeout=30,
            what="top refreshed",
        )
        assert pane(host).count("nspawnctl top - ") == 1
        host.run(["tmux", "send-keys", "-t", "top", "q"])
        host.wait_for(
            lambda: host.run(["tmux", "has-session", "-t", "top"], check=False).returncode != 0,
            timeout=30,
            what="top quit on q",
        )
    finally:
        host.run(["tmux", "kill-server"], check=False)
    piped = host.run(["sh", "-c", f"{command} | cat"]).stdout
    assert "\x1b" not in piped
    lines = piped.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATE", "CPU%"]
    assert any(line.split()[0] == "watched" for line in lines[1:])
