"""A burst of cold starts: the first connection to each of N stopped containers at
once, as after a host's reboot or from a monitor probing every site, for N = 10, 20, 40.

Prints, per N: served and lost connections, the median and the last SSH banner, the CPU
the machine used meanwhile and the ideal that CPU allows (spread over all its CPUs),
then the time `nspawnctl stop` of all N at once takes and how many of those stops
failed (it then waits until none is left running).

Runs inside a throw-away systemd host (tests/testhost.py); needs root and the cached
image of the tests. Usage: python3 -m bench.cold_burst [--sizes 10,20,40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from tests.integration.conftest import CLIENT_KEY, IMAGE_CACHE, booted_host, cached_image
from tests.integration.test_core import machines
from tests.integration.test_load import BURST
from tests.testhost import TestHost

FIRST_PORT = 3001

# Every container's `nspawnctl stop` at once, from inside the host; prints the seconds
# until the last has returned, and how many failed.
STOP_ALL = """
import subprocess, sys, time
start = time.perf_counter()
stops = [subprocess.Popen([sys.executable, "-m", "nspawnctl", "stop", n],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
         for n in sys.argv[1:]]
failed = sum(stop.wait() != 0 for stop in stops)
print(f"{time.perf_counter() - start:.2f} {failed}")
"""


def cpu_seconds() -> float:
    """CPU time this whole machine has used (/proc/stat: every CPU, all but idle and
    iowait). cgroup v1 accounting here has no group of the test host's own; the bench is
    the machine's only load."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def burst(host: TestHost, size: int) -> None:
    names = [f"c{i}" for i in range(size)]
    ports = [str(FIRST_PORT + i) for i in range(size)]
    assert not set(names) & set(machines(host)), "not all stopped"
    before = cpu_seconds()
    out = host.run([sys.executable, "-c", BURST, *ports], timeout=600).stdout
    cpu = cpu_seconds() - before
    rows = [line.split() for line in out.splitlines()]
    served = [float(seconds) for _port, result, seconds in rows if result == "served"]
    lost = [result for _port, result, _seconds in rows if result != "served"]
    print(
        f"N={size:<3} served {len(served):>3}  lost {len(lost):>2} {' '.join(sorted(lost))}"
        f"\n      banner: median {statistics.median(served):6.2f} s"
        f"   last {max(served):6.2f} s"
    )
    cpus = os.cpu_count() or 1
    print(f"      CPU used {cpu:6.1f} s: the ideal on {cpus} CPUs is {cpu / cpus:6.2f} s")
    stop = host.run([sys.executable, "-c", STOP_ALL, *names], timeout=600).stdout.split()
    host.wait_for(lambda: not set(names) & set(machines(host)), timeout=120, what="all stopped")
    print(f"      stop of all {size} at once: {float(stop[0]):6.2f} s, {stop[1]} failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10,20,40")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    cached_image()
    with booted_host(IMAGE_CACHE) as host:
        for i in range(max(sizes)):
            host.write_file(
                f"/etc/nspawnctl/c{i}.yaml",
                f"ssh: {{listen: {FIRST_PORT + i}, authorized_keys: [{CLIENT_KEY}.pub]}}\n",
            )
            host.run([sys.executable, "-m", "nspawnctl", "add", f"c{i}"], timeout=300)
        for size in sizes:
            burst(host, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
