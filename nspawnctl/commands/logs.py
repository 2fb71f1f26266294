"""logs: the journal of one container, or of every container merged with the host's.

Entries are attributed by where they are stored, never by their fields, which a guest
writes as it likes (nspawnctl/journal.py): a container's own entries come only from its
own journal directory, the host's only from the host's own journal."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys

from nspawnctl import journal
from nspawnctl.commands import add_name, add_verb
from nspawnctl.container import config_names, machine_id, require_installed, units_of
from nspawnctl.errors import Exit, OperationError, UsageError
from nspawnctl.journal import HOST, Entry, Problems, Source
from nspawnctl.names import machine_name, service_unit
from nspawnctl.paths import Paths


def _lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "show a container's journal, or with --all every journal merged with the host's"
    p = add_verb(sub, "logs", help_text, run)
    add_name(p, nargs="?")
    p.add_argument("--all", action="store_true", help="every container merged with the host")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    p.add_argument("-n", "--lines", type=_lines, metavar="N", help="show the last N entries")
    p.add_argument(
        "-o",
        "--output",
        metavar="FORMAT",
        choices=journal.FORMATS,
        default="short",
        help=f"one of {', '.join(journal.FORMATS)} (default short)",
    )


def _container_source(paths: Paths, name: str) -> Source | None:
    mid = machine_id(paths, name)
    # machine_id() is the host's own record; it still becomes a path, so check it here.
    if mid is None or not journal.MACHINE_ID.match(mid):
        return None
    return Source(name, paths.journal_dir / mid)


def host_label(names: list[str]) -> str:
    """How the host's lines are labelled: its hostname, as journalctl shows it, unless a
    container has that name (or it is no plain name): then `.host`, which none can have."""
    try:
        hostname = socket.gethostname()
        machine_name(hostname)
    except (OSError, argparse.ArgumentTypeError):
        return HOST
    return HOST if hostname in names else hostname


def sources(args: argparse.Namespace, paths: Paths) -> list[Source]:
    if args.all == (args.name is not None):
        raise UsageError("give either NAME or --all")
    if args.all:
        found = [_container_source(paths, name) for name in config_names(paths)]
        return [Source(HOST), *(s for s in found if s is not None)]
    require_installed(paths, args.name)
    own = _container_source(paths, args.name)
    if own is None:
        raise OperationError(f"{args.name} has no machine-id, so no journal of its own")
    # The host's entries about the container's units: those its processes wrote (the
    # nspawn process, which also relays the guest's console) and those systemd wrote
    # about the units. Read from the host's own journal only, so no guest's file can
    # add to them: there, _SYSTEMD_UNIT is journald's and UNIT= the host's processes'.
    matches: list[str] = []
    for unit in units_of(paths, args.name):
        matches += [f"_SYSTEMD_UNIT={unit}", "+", f"UNIT={unit}", "+"]
    return [own, Source(HOST, matches=tuple(matches[:-1]))]


def run(args: argparse.Namespace, paths: Paths) -> int:
    chosen = sources(args, paths)
    known = config_names(paths)
    labels = {HOST: host_label(known)}
    console_units = {service_unit(name): name for name in known}
    out = sys.stdout

    def emit(entry: Entry) -> None:
        entry = journal.relabel(entry, console_units)
        text = journal.format_entry(entry, args.output, labels.get(entry.source, entry.source))
        out.write(text + "\n")

    problems = Problems()
    lines = args.lines
    if args.follow and lines is None:
        lines = 10  # as journalctl --follow
    try:
        cursors = journal.history(chosen, lines, emit, problems)
        out.flush()
        if args.follow:
            journal.follow(chosen, cursors, emit, problems, flush=out.flush)
    except BrokenPipeError:
        # Our reader went away (`| head`): not an error. Keep Python from failing again
        # on the final flush of stdout.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.OK
    return Exit.FAILED if problems.failed else Exit.OK
