"""Timing a command inside the test host, from inside it: nsenter and the harness
would otherwise be part of every figure."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Mapping, Sequence

from tests.testhost import TestHost

_TIMER = (
    "import subprocess, sys, time; s = time.perf_counter(); "
    "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(f'{time.perf_counter() - s:.4f}')"
)


def timed(host: TestHost, argv: Sequence[str]) -> float:
    """Seconds `argv` took to run inside `host`; fails if it failed."""
    return float(host.run([sys.executable, "-c", _TIMER, *argv]).stdout)


def time_commands(
    host: TestHost, commands: Mapping[str, Sequence[str]], runs: int
) -> dict[str, list[float]]:
    """Each command `runs` times in `host`: label -> seconds of each run."""
    return {label: [timed(host, argv) for _ in range(runs)] for label, argv in commands.items()}


def print_times(results: Mapping[str, Sequence[float]]) -> None:
    """One line per command: its median and its slowest run, in ms."""
    for label, times in results.items():
        print(
            f"{label:<50} median {statistics.median(times) * 1000:7.0f} ms   "
            f"max {max(times) * 1000:7.0f} ms"
        )


def fleet_arguments(doc: str | None) -> argparse.Namespace:
    """--containers N (defined ones, 1000) and --runs N (of each command, 5)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--containers", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    return parser.parse_args()
