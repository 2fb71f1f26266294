"""`nspawnctl add` from a cached image, next to what it replaces: a fresh debootstrap of
the same image. Also the disk each added container costs (its layer) after a first boot
and an SSH login, next to the image it shares.

Runs `add` inside a throw-away systemd host (tests/testhost.py); the debootstrap runs on
this machine (the test host has no network). Needs root and network access to a Debian
mirror. Usage: python3 -m bench.add_cached [--runs N] [--skip-debootstrap]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import timed
from nspawnctl.bootstrap import bootstrapper
from nspawnctl.guesttree import disk_usage
from nspawnctl.recipe import parse_image
from tests.integration.conftest import (
    CLIENT_KEY,
    IMAGE_CACHE,
    STATE_IN_HOST,
    booted_host,
    cached_image,
    ssh,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--skip-debootstrap", action="store_true")
    args = parser.parse_args()
    image = cached_image()
    adds, layers = [], []
    with booted_host(IMAGE_CACHE) as host:
        for index in range(args.runs):
            name, port = f"bench{index}", str(2500 + index)
            adds.append(
                timed(
                    host,
                    [
                        sys.executable,
                        "-m",
                        "nspawnctl",
                        "add",
                        name,
                        "--ssh",
                        port,
                        "--key",
                        f"{CLIENT_KEY}.pub",
                    ],
                )
            )
            ssh(host, int(port), "true")
            du = host.run(["du", "-s", "--block-size=1", f"{STATE_IN_HOST}/layers/{name}"])
            layers.append(int(du.stdout.split()[0]))
    print(
        f"# nspawnctl add, {args.runs} containers from one cached image "
        "(nested in a throw-away systemd host)"
    )
    print(
        f"add from cached image       median {statistics.median(adds):6.2f} s   "
        f"max {max(adds):6.2f} s"
    )
    if not args.skip_debootstrap:
        with tempfile.TemporaryDirectory(prefix="bench-debootstrap-", dir="/var/tmp") as tmp:
            start = time.perf_counter()
            bootstrapper("debootstrap").build(
                parse_image("debian:bookworm"), Path(tmp) / "root", lambda _line: None
            )
            fresh = time.perf_counter() - start
        print(f"fresh debootstrap (plain)   {fresh:6.2f} s")
    mb = 2**20
    print(
        f"layer per container after first boot + SSH login: median "
        f"{statistics.median(layers) / mb:.2f} MB, max {max(layers) / mb:.2f} MB"
    )
    print(
        f"shared image {image.recipe.image} ({image.current.name}): "
        f"{disk_usage(image.current) / mb:.0f} MB, once; "
        f"{args.runs} full copies would be {args.runs * disk_usage(image.current) / mb:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
