"""logs: the journal of one container, or of every container merged with the host's."""

from __future__ import annotations

import argparse

from nspawnctl.commands.lifecycle import require_installed
from nspawnctl.container import machine_id
from nspawnctl.errors import OperationError, UsageError
from nspawnctl.names import machine_name, service_unit, socket_unit
from nspawnctl.paths import Paths
from nspawnctl.run import run_interactive


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "show a container's journal, or with --all every journal merged (journalctl -m)"
    p = sub.add_parser("logs", help=help_text, description=help_text)
    p.add_argument("name", metavar="NAME", type=machine_name, nargs="?")
    p.add_argument("--all", action="store_true", help="every container merged with the host")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    p.add_argument("-n", "--lines", type=int, metavar="N", help="show the last N entries")
    p.add_argument("-o", "--output", metavar="FORMAT", help="journalctl's output format")
    p.set_defaults(handler=run)


def journal_argv(args: argparse.Namespace, paths: Paths) -> list[str]:
    if args.all == (args.name is not None):
        raise UsageError("give either NAME or --all")
    # --merge reads every journal below /var/log/journal, which includes each
    # container's, kept there by systemd-nspawn --link-journal=try-host.
    argv = ["journalctl", "--merge", "--no-pager"]
    if args.follow:
        argv.append("--follow")
    if args.output is not None:
        argv.append(f"--output={args.output}")
    if args.lines is not None:
        argv.append(f"--lines={args.lines}")
    if args.name is not None:
        require_installed(paths, args.name)
        mid = machine_id(paths, args.name)
        if mid is None:
            raise OperationError(f"{args.name} has no /etc/machine-id, so no journal of its own")
        # The guest's own entries, or (+) the host's entries about its units.
        service, socket = service_unit(args.name), socket_unit(args.name)
        argv += [
            f"_MACHINE_ID={mid}",
            "+",
            f"_SYSTEMD_UNIT={service}",
            "+",
            f"UNIT={service}",
            f"UNIT={socket}",
        ]
    return argv


def run(args: argparse.Namespace, paths: Paths) -> int:
    return run_interactive(journal_argv(args, paths))
