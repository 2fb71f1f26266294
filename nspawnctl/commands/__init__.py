"""One module per verb (or per family of small verbs). Each has `register(subparsers)`,
which adds its parser and sets `handler`: `(args, paths) -> exit code`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any, Literal

from nspawnctl.names import machine_name
from nspawnctl.paths import Paths

Handler = Callable[[argparse.Namespace, Paths], int]


def add_verb(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    verb: str,
    help_text: str,
    handler: Handler,
    **options: Any,
) -> argparse.ArgumentParser:
    """The parser of a verb: its help (also its description, unless given) and handler."""
    options.setdefault("description", help_text)
    parser = sub.add_parser(verb, help=help_text, **options)
    parser.set_defaults(handler=handler)
    return parser


def add_verbs(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    verbs: Mapping[str, tuple[str, Handler]],
) -> dict[str, argparse.ArgumentParser]:
    """A parser for each verb, with its help and its handler: one row each."""
    return {verb: add_verb(sub, verb, text, handler) for verb, (text, handler) in verbs.items()}


def add_name(parser: argparse.ArgumentParser, **options: Any) -> None:
    """The container's NAME, the same argument for every verb that takes one."""
    parser.add_argument("name", metavar="NAME", type=machine_name, **options)


# Arguments that name a file of the machine nspawnctl is started on. With -H they travel
# with the call (remote.py): an input is sent to the far host first, an output fetched
# back after; "key" is an input if it names a file, else a key line given as it is;
# "config" is a directory of YAML files sent as this machine reads them, each link in it
# followed (web.yaml -> ../shared/web.yaml), where an input's links go as links.
FileRole = Literal["input", "output", "key", "config"]
_FILE_ROLE = "nspawnctl_file_role"


def add_file(
    parser: argparse.ArgumentParser, *names: str, role: FileRole, **options: Any
) -> argparse.Action:
    """An argument naming a local file or directory (see FileRole)."""
    action = parser.add_argument(*names, **options)
    setattr(action, _FILE_ROLE, role)
    return action


def file_role(action: argparse.Action) -> FileRole | None:
    role: FileRole | None = getattr(action, _FILE_ROLE, None)
    return role
