"""metrics and top: every container's figures, for a scraper and for a person."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import select
import socket
import sys
import termios
import time
import tty
from collections.abc import Iterator, Sequence
from typing import Any

from nspawnctl import metrics
from nspawnctl.commands import add_verb
from nspawnctl.errors import Exit
from nspawnctl.listen import Listen
from nspawnctl.log import log
from nspawnctl.metrics import DEFAULT_LISTEN, Sample, collect, exposition
from nspawnctl.paths import Paths
from nspawnctl.screen import shown

_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_SECONDS = 10


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub,
        "metrics",
        "print every container's metrics in the Prometheus text format",
        run_metrics,
    )
    switch = p.add_mutually_exclusive_group()
    switch.add_argument(
        "--enable",
        action="store_true",
        help="serve them over HTTP from a socket-activated unit (nspawnctl-metrics.socket)",
    )
    switch.add_argument("--disable", action="store_true", help="stop serving them over HTTP")
    # The endpoint's own service: one scrape on standard input and output.
    switch.add_argument("--http", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--listen",
        metavar="ADDRESS:PORT",
        type=_listen,
        default=Listen.parse(DEFAULT_LISTEN),
        help=f"with --enable: where the endpoint listens (default {DEFAULT_LISTEN})",
    )
    t = add_verb(
        sub,
        "top",
        "a live table of every container: state, CPU, memory, tasks, IO and connections",
        run_top,
    )
    t.add_argument(
        "-d",
        "--delay",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="between refreshes (default 2); CPU and IO are rates over this time",
    )
    t.add_argument(
        "-n",
        "--iterations",
        type=int,
        metavar="N",
        help="stop after N tables (default: until q or Ctrl-C on a terminal; 1 when piped)",
    )


def _listen(text: str) -> Listen:
    try:
        return Listen.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} {err}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0.1 to 3600 seconds")
    return value


def run_metrics(args: argparse.Namespace, paths: Paths) -> int:
    if args.enable:
        metrics.enable(paths, args.listen)
        log.info(
            "metrics at http://%s/metrics (nspawnctl-metrics.socket)", args.listen.unit_value()
        )
        return Exit.OK
    if args.disable:
        metrics.disable(paths)
        return Exit.OK
    if args.http:
        return _serve_one(paths)
    samples, errors = collect(paths)
    sys.stdout.write(exposition(samples, len(errors)))
    return Exit.OK


# --- one scrape over HTTP (the endpoint's service, Accept=yes) -----------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    paths: Paths
    server_version = "nspawnctl"
    timeout = _REQUEST_SECONDS  # a client that sends no request in time is dropped

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        if self.path.split("?")[0] not in ("/", "/metrics"):
            self.send_error(404, "the metrics are at /metrics")
            return
        samples, errors = collect(self.paths)
        data = exposition(samples, len(errors)).encode()
        self.send_response(200)
        self.send_header("Content-Type", _CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def _serve_one(paths: Paths) -> int:
    """Answer the one connection systemd accepted for us, on standard input."""
    connection = socket.socket(fileno=os.dup(0))
    handler = type("Handler", (_Handler,), {"paths": paths})
    try:
        peer = connection.getpeername()
    except OSError:
        peer = ("", 0)
    with connection:
        # http.server's handler reads one request and answers it; a bad one gets a 400.
        handler(connection, peer, None)
        # Standard input and output are the same socket: end it here, not at exit.
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
    return Exit.OK


# --- top ---------------------------------------------------------------------------------


_COLUMNS = ("NAME", "STATE", "CPU%", "MEMORY", "TASKS", "IO-READ/s", "IO-WRITE/s", "CONNS")


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def _rate(now: float | None, before: float | None, seconds: float) -> float | None:
    if now is None or before is None or seconds <= 0:
        return None
    return max(0.0, now - before) / seconds


def table(now: Sequence[Sample], before: Sequence[Sample], seconds: float) -> list[list[str]]:
    """Rows of `top`: rates over the `seconds` between two samples, busiest CPU first."""
    earlier = {s.name: s.usage for s in before}
    rows = []
    for s in now:
        prev = earlier.get(s.name)
        cpu = _rate(s.usage.cpu_seconds, prev.cpu_seconds if prev else None, seconds)
        reads = _rate(s.usage.io_read_bytes, prev.io_read_bytes if prev else None, seconds)
        writes = _rate(s.usage.io_written_bytes, prev.io_written_bytes if prev else None, seconds)
        rows.append(
            (
                -(cpu or 0.0),
                s.name,
                [
                    s.name,
                    s.state + (" (socket failed)" if s.socket_failed else ""),
                    "-" if cpu is None else f"{cpu * 100:.1f}",
                    _size(s.usage.memory_bytes),
                    "-" if s.usage.tasks is None else str(s.usage.tasks),
                    _size(reads),
                    _size(writes),
                    str(s.connections),
                ],
            )
        )
    return [list(_COLUMNS)] + [row for _cpu, _name, row in sorted(rows)]


def formatted(rows: list[list[str]]) -> list[str]:
    rows = [[shown(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return [
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def run_top(args: argparse.Namespace, paths: Paths) -> int:
    live = sys.stdout.isatty() and sys.stdin.isatty()
    iterations = args.iterations if args.iterations is not None else (None if live else 1)
    before, _errors = collect(paths, fold=False)
    taken = time.monotonic()
    shown_tables = 0
    with _keys() if live else contextlib.nullcontext() as keys:
        while iterations is None or shown_tables < iterations:
            if keys is not None and _quit_pressed(keys, args.delay):
                break
            if keys is None:
                time.sleep(args.delay)  # the interval the rates are taken over
            now, errors = collect(paths, fold=False)
            at = time.monotonic()
            lines = formatted(table(now, before, at - taken))
            before, taken = now, at
            shown_tables += 1
            if live:
                # Home and clear, then the table: it stays in place, as top's does.
                header = (
                    f"nspawnctl top - {time.strftime('%H:%M:%S')} - {len(now)} containers"
                    f" - every {args.delay:g} s - q quits"
                )
                sys.stdout.write("\x1b[H\x1b[2J" + "\n".join([header, "", *lines]) + "\n")
            else:
                sys.stdout.write("\n".join(lines) + "\n")
            for err in errors:
                log.warning("%s", err.message)
            sys.stdout.flush()
    return Exit.OK


@contextlib.contextmanager
def _keys() -> Iterator[int]:
    """The terminal in cbreak mode (a key arrives without Enter), restored after."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int, seconds: float) -> bool:
    """Wait `seconds` for q; the wait is the refresh interval."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _w, _x = select.select([fd], [], [], left)
        if ready and os.read(fd, 1) in (b"q", b"Q", b""):
            return True
    return False
