"""How long a container cannot be reached while `migrate` moves it: from the last
connection the source served to the first one the target served, with a client
connecting to both hosts every 0.2 s. Beside it, the plain alternative's floor: the same
client's gap across a stop of the container on one host (a cold start, no move).

Two throw-away hosts on a private bridge (tests/integration/fleetnet.py); run as root
from a checkout: python3 -m bench.migrate_downtime"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable

from tests.integration.conftest import CLIENT_KEY, IMAGE_CACHE, cached_image, nspawnctl, ssh_argv
from tests.integration.fleetnet import Fleet, fleet, on_client
from tests.testhost import TestHost

PORT = 2800
RUNS = 3


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
    with fleet(IMAGE_CACHE) as f:
        a, b = f.address(0), f.address(1)
        on_client(f, "-H", a, "add", "dt", "--ssh", str(PORT), "--key", f"{CLIENT_KEY}.pub")
        for run in range(RUNS):
            source, target = (a, b) if run % 2 == 0 else (b, a)
            host = f.servers[run % 2]
            stop_gap = _gap(f, (source,), functools.partial(_stop, host))
            started = time.monotonic()
            moved = _gap(f, (source, target), functools.partial(_move, f, source, target))
            took = time.monotonic() - started
            print(
                f"run {run}: migrate: no answer for {moved:.1f} s (the verb with the probes "
                f"{took:.1f} s); plain stop and cold start on one host: {stop_gap:.1f} s",
                flush=True,
            )


def _stop(host: TestHost) -> None:
    nspawnctl(host, "stop", "dt")


def _move(f: Fleet, source: str, target: str) -> None:
    on_client(f, "-H", source, "migrate", "dt", "--to", target)


if __name__ == "__main__":
    main()
