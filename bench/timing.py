"""Timing a command inside the test host, from inside it: nsenter and the harness
would otherwise be part of every figure."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tests.testhost import TestHost

_TIMER = (
    "import subprocess, sys, time; s = time.perf_counter(); "
    "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(f'{time.perf_counter() - s:.4f}')"
)


def timed(host: TestHost, argv: Sequence[str]) -> float:
    """Seconds `argv` took to run inside `host`; fails if it failed."""
    return float(host.run([sys.executable, "-c", _TIMER, *argv]).stdout)
