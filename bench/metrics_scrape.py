"""The cost of a metrics scrape with 1,000 defined containers: `nspawnctl metrics`, and a
scrape over HTTP of the socket-activated endpoint (a process per scrape), next to the
plain alternative on the same host (`systemctl list-units` of their units, which is
only the states) and to what every nspawnctl command pays to start.

Each container gets an events file of 600 boots, as after weeks of idle cycling, so
the figure includes counting them. Runs inside a throw-away systemd host
(tests/testhost.py); needs root.
Usage: python3 -m bench.metrics_scrape [--containers N] [--runs N]
"""

from __future__ import annotations

import sys

from bench.timing import fleet_arguments, print_times, time_commands
from tests.integration.conftest import CLIENT_KEY, IMAGE_CACHE, booted_host, cached_image

WRITE = """
import os, sys
key = open(sys.argv[2]).read().strip()
os.makedirs("/var/lib/nspawnctl/events", exist_ok=True)
boots = "".join(f"start {i}.00\\nready {i}.30\\nend {i + 50}.00 success 0\\n" for i in range(600))
for i in range(int(sys.argv[1])):
    with open(f"/etc/nspawnctl/c{i}.yaml", "w") as f:
        f.write(f"ssh: {{listen: {10000 + i}, authorized_keys: ['{key}']}}\\n")
    with open(f"/var/lib/nspawnctl/events/c{i}", "w") as f:
        f.write(boots)
"""

SCRAPE = """
import urllib.request
urllib.request.urlopen("http://127.0.0.1:9847/metrics", timeout=120).read()
"""


def main() -> int:
    args = fleet_arguments(__doc__)
    cached_image()
    nspawnctl = [sys.executable, "-m", "nspawnctl"]
    with booted_host(IMAGE_CACHE) as host:
        host.run(["mkdir", "-p", "/etc/nspawnctl"])
        host.run([sys.executable, "-c", WRITE, str(args.containers), f"{CLIENT_KEY}.pub"])
        host.run([*nspawnctl, "add", "real", "--ssh", "2222", "--key", f"{CLIENT_KEY}.pub"])
        host.run([*nspawnctl, "start", "real"])
        host.run([*nspawnctl, "metrics", "--enable"])
        lines = host.run([*nspawnctl, "metrics"]).stdout.count("\n")
        size = host.run(["du", "-sk", "/var/lib/nspawnctl/events"]).stdout.split()[0]
        commands = {
            "nspawnctl metrics": [*nspawnctl, "metrics"],
            "scrape over HTTP (a process per scrape)": [sys.executable, "-c", SCRAPE],
            "of which start-up: nspawnctl --version": [*nspawnctl, "--version"],
            "plain: systemctl list-units --all (states only)": [
                "systemctl",
                "list-units",
                "--all",
                "--no-pager",
                "nspawnctl-*",
                "systemd-nspawn@*",
            ],
        }
        results = time_commands(host, commands, args.runs)
    print(
        f"# {args.containers + 1} defined containers, {args.runs} runs each; "
        f"{lines} lines of metrics; events files after the first scrape's fold: {size} KiB"
    )
    print_times(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
