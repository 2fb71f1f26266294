"""`nspawnctl list` and `status` with 1,000 defined containers, next to the plain
alternative on the same host (`systemctl list-units` of their sockets).

Runs inside a throw-away systemd host (tests/testhost.py); needs root.
Usage: python3 -m bench.fleet_list [--containers N] [--runs N]
"""

from __future__ import annotations

import sys

from bench.timing import fleet_arguments, print_times, time_commands
from tests.integration.conftest import CLIENT_KEY, IMAGE_CACHE, booted_host, cached_image

WRITE = """
import sys
key = open(sys.argv[2]).read().strip()
for i in range(int(sys.argv[1])):
    with open(f"/etc/nspawnctl/c{i}.yaml", "w") as f:
        f.write(f"ssh: {{listen: {10000 + i}, authorized_keys: ['{key}']}}\\n")
"""


def main() -> int:
    args = fleet_arguments(__doc__)
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
        results = time_commands(host, commands, args.runs)
    print(f"# {args.containers + 1} defined containers, {args.runs} runs each")
    print_times(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
