from __future__ import annotations

import argparse

from nspawnctl import container
from nspawnctl.commands import add_name, add_verb
from nspawnctl.errors import Exit
from nspawnctl.paths import Paths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub, "remove", "stop a container and delete its units, layer and configuration", run
    )
    add_name(p)
    p.add_argument(
        "--keep-rootfs",
        action="store_true",
        help="keep the container's own layer (its files) in the state directory",
    )


def run(args: argparse.Namespace, paths: Paths) -> int:
    container.remove(paths, args.name, keep_rootfs=args.keep_rootfs)
    return Exit.OK
