"""Logging, and the one-line progress display for long steps on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

log = logging.getLogger("nspawnctl")


def setup(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nspawnctl: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)


class Progress:
    """Shows the latest line of a long step in place on a terminal; silent otherwise,
    so scripts and logs get only the outcome."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.lines = 0

    def __call__(self, line: str) -> None:
        self.lines += 1
        if self.live:
            text = f"{self.label}: {line.strip()}"[:100]
            self.stream.write(f"\r\x1b[K{text}")
            self.stream.flush()

    def done(self, summary: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
        log.info("%s", summary)
