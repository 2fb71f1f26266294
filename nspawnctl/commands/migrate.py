"""migrate: a container moved to another host, with its data (migrate.py)."""

from __future__ import annotations

import argparse

from nspawnctl import migrate
from nspawnctl.commands import add_name, add_verb
from nspawnctl.errors import Exit, UsageError
from nspawnctl.log import log
from nspawnctl.paths import Paths
from nspawnctl.ssh import Destination


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub,
        "migrate",
        "move a container, with its data, to another host's nspawnctl over ssh",
        run_migrate,
    )
    add_name(p)
    p.add_argument("--to", metavar="[USER@]HOST[:PORT]", help="the host it moves to")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep it here afterwards, stopped and not listening, instead of removing it",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="stop a running container before copying its layer, instead of copying it "
        "while it runs and then only what changed",
    )
    p.add_argument(
        "--abort",
        action="store_true",
        help="take back a migrate that was cut short: its socket listens here again",
    )


def run_migrate(args: argparse.Namespace, paths: Paths) -> int:
    if args.abort:
        migrate.abort(paths, args.name)
        log.info(
            "%s listens here again; a copy that reached the other host stays there "
            "(`nspawnctl -H HOST remove %s` there)",
            args.name,
            args.name,
        )
        return Exit.OK
    if args.to is None:
        raise UsageError("migrate needs --to [USER@]HOST[:PORT]", hint="or --abort")
    moved = migrate.migrate(
        paths, args.name, Destination.parse(args.to), keep=args.keep, cold=args.cold
    )
    where = "kept here, stopped" if args.keep else "removed here"
    if moved.finished_only:
        log.info("%s was on %s already: %s", args.name, moved.destination, where)
    else:
        log.info(
            "%s moved to %s, where its socket listens (closed for %.1f s); %s",
            args.name,
            moved.destination,
            moved.closed_seconds,
            where,
        )
    return Exit.OK
