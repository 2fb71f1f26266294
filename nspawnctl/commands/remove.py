from __future__ import annotations

import argparse

from nspawnctl import container
from nspawnctl.commands import add_name
from nspawnctl.errors import Exit
from nspawnctl.paths import Paths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "stop a container and delete its units, layer and configuration"
    p = sub.add_parser("remove", help=help_text, description=help_text)
    add_name(p)
    p.add_argument(
        "--keep-rootfs",
        action="store_true",
        help="keep the container's own layer (its files) in the state directory",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, paths: Paths) -> int:
    container.remove(paths, args.name, keep_rootfs=args.keep_rootfs)
    return Exit.OK
