"""One module per verb (or per family of small verbs). Each has `register(subparsers)`,
which adds its parser and sets `handler`: `(args, paths) -> exit code`."""

from __future__ import annotations

import argparse
from typing import Any

from nspawnctl.names import machine_name


def add_name(parser: argparse.ArgumentParser, **options: Any) -> None:
    """The container's NAME, the same argument for every verb that takes one."""
    parser.add_argument("name", metavar="NAME", type=machine_name, **options)
