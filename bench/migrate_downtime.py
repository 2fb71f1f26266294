"""How long a container cannot be reached while `migrate` moves it: from the last
connection the source served to the first one the target served, with a client
connecting to both hosts every 0.2 s. For a layer with no data and one with DATA_MB of
it, a migrate that copies the running container first (the default) and one that stops
it first (--cold). Beside them, the plain alternative's floor: the same client's gap
across a stop of the container on one host (a cold start, no move).

Two throw-away hosts on a private bridge (tests/integration/fleetnet.py); run as root
from a checkout: python3 -m bench.migrate_downtime [RATE]. A veth is faster than most
links between hosts: RATE (tc's units: 1gbit, 100mbit) holds each server's link to it."""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import time
from collections.abc import Callable

from tests.integration.conftest import CLIENT_KEY, IMAGE_CACHE, cached_image, nspawnctl, ssh_argv
from tests.integration.fleetnet import Fleet, fleet, on_client
from tests.testhost import TestHost

PORT = 2800
RUNS = 2
DATA_MB = (0, 200)


def _prober(f: Fleet, address: str) -> Callable[[], bool]:
    argv = ssh_argv(PORT, "hostname")
    argv[-2] = f"root@{address}"
    argv[argv.index("ConnectTimeout=60")] = "ConnectTimeout=2"
    return lambda: f.client.run(argv, check=False, timeout=30).returncode == 0


def _gap(f: Fleet, addresses: tuple[str, ...], act: Callable[[], None]) -> float:
    """The longest time, around `act`, between two connections served (at any of
    `addresses`): how long a client retrying every 0.2 s got no answer."""
    served: list[float] = []
    done = threading.Event()

    def loop(address: str) -> None:
        probe = _prober(f, address)
        while not done.is_set():
            if probe():
                served.append(time.monotonic())
            done.wait(0.2)

    threads = [threading.Thread(target=loop, args=(a,)) for a in addresses]
    for thread in threads:
        thread.start()
    try:
        done.wait(2)  # served before
        act()
        ended = time.monotonic()
        deadline = ended + 60
        while not [t for t in served if t > ended] and time.monotonic() < deadline:
            done.wait(0.2)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    times = sorted(served)
    return max(later - earlier for earlier, later in itertools.pairwise(times))


def main() -> None:
    cached_image()
    rate = sys.argv[1] if len(sys.argv) > 1 else None
    with fleet(IMAGE_CACHE) as f:
        a, b = f.address(0), f.address(1)
        if rate:
            for server in f.servers:
                limit = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate]
                server.run([*limit, "burst", "256kb", "latency", "50ms"])
            print(f"each server's link held to {rate}", flush=True)
        on_client(f, "-H", a, "add", "dt", "--ssh", str(PORT), "--key", f"{CLIENT_KEY}.pub")
        for megabytes in DATA_MB:
            # Random: the cold path's compression gains nothing, as with most real data.
            write = f"head -c {megabytes << 20} /dev/urandom > /srv/data"
            argv = ssh_argv(PORT, write)
            argv[-2] = f"root@{a}"
            f.client.run(argv, timeout=300)
            stop_gap = _gap(f, (a,), functools.partial(_stop, f.servers[0]))
            print(
                f"{megabytes} MB of data: plain stop and cold start on one host: "
                f"no answer for {stop_gap:.1f} s",
                flush=True,
            )
            for run in range(RUNS):
                for source, target, cold in ((a, b, False), (b, a, True)):
                    started = time.monotonic()
                    move = functools.partial(_move, f, source, target, cold=cold)
                    moved = _gap(f, (source, target), move)
                    took = time.monotonic() - started
                    how = "--cold " if cold else "copied first"
                    print(
                        f"{megabytes} MB of data, run {run}: migrate {how}: no answer for "
                        f"{moved:.1f} s (the verb with the probes {took:.1f} s)",
                        flush=True,
                    )


def _stop(host: TestHost) -> None:
    nspawnctl(host, "stop", "dt")


def _move(f: Fleet, source: str, target: str, *, cold: bool) -> None:
    on_client(f, "-H", source, "migrate", "dt", "--to", target, *(["--cold"] if cold else []))


if __name__ == "__main__":
    main()
