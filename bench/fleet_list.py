"""`nspawnctl list` and `status` with 1,000 defined containers, next to the plain
alternative on the same host (`systemctl list-units` of their sockets).

Runs inside a throw-away systemd host (tests/testhost.py); needs root.
Usage: python3 -m bench.fleet_list [--containers N] [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench.timing import timed
from tests.integration.conftest import CLIENT_KEY, IMAGE_CACHE, booted_host, cached_image

WRITE = """
import sys
key = open(sys.argv[2]).read().strip()
for i in range(int(sys.argv[1])):
    with open(f"/etc/nspawnctl/c{i}.yaml", "w") as f:
        f.write(f"ssh: {{listen: {10000 + i}, authorized_keys: ['{key}']}}\\n")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--containers", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cached_image()
    with booted_host(IMAGE_CACHE) as host:
        host.run(["mkdir", "-p", "/etc/nspawnctl"])
        host.run([sys.executable, "-c", WRITE, str(args.containers), f"{CLIENT_KEY}.pub"])
        host.run(
            [
                sys.executable,
                "-m",
                "nspawnctl",
                "add",
                "real",
                "--ssh",
                "2222",
                "--key",
                f"{CLIENT_KEY}.pub",
            ]
        )
        commands = {
            "nspawnctl list": [sys.executable, "-m", "nspawnctl", "list"],
            "nspawnctl list --json": [sys.executable, "-m", "nspawnctl", "list", "--json"],
            "nspawnctl status real": [sys.executable, "-m", "nspawnctl", "status", "real"],
            # What every command pays before it does anything: Python and the imports.
            "of which start-up: nspawnctl --version": [
                sys.executable,
                "-m",
                "nspawnctl",
                "--version",
            ],
            "plain: systemctl list-units --all 'nspawnctl-*'": [
                "systemctl",
                "list-units",
                "--all",
                "--no-pager",
                "nspawnctl-*",
            ],
        }
        results = {
            label: [timed(host, argv) for _ in range(args.runs)] for label, argv in commands.items()
        }
    print(f"# {args.containers + 1} defined containers, {args.runs} runs each")
    for label, times in results.items():
        print(
            f"{label:<50} median {statistics.median(times) * 1000:7.0f} ms   "
            f"max {max(times) * 1000:7.0f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
