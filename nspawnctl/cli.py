"""Command line parsing, and the one place where errors become exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nspawnctl import __version__, recovery, remote
from nspawnctl.commands import (
    add,
    apply,
    backup,
    exec,
    image,
    lifecycle,
    logs,
    metrics,
    migrate,
    remove,
    settings,
    show,
    which,
)
from nspawnctl.errors import Exit, NspawnctlError, from_os_error
from nspawnctl.log import log, setup
from nspawnctl.paths import Paths, environment_variables

# Verbs that touch no container, so they do not settle an interrupted change first: a
# scrape or a monitor must neither wait for another nspawnctl nor finish its work.
_PURE_VERBS = frozenset({"render", "metrics", "top"})

# In the order `--help` lists them; each module registers its verbs.
_COMMAND_MODULES = (
    add,
    apply,
    remove,
    show,
    metrics,
    lifecycle,
    settings,
    logs,
    exec,
    which,
    backup,
    migrate,
    image,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own errors follow our one-line format and exit code.
        self.print_usage(sys.stderr)
        print(f"nspawnctl: error: {message}\nhint: see `{self.prog} --help`", file=sys.stderr)
        sys.exit(Exit.USAGE)


def build_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(
        f"  {var:<24} default {default}" for var, default in environment_variables().items()
    )
    parser = _Parser(
        prog="nspawnctl",
        description="Socket-activated systemd-nspawn containers, one YAML file each.",
        epilog=f"Environment (every location can be moved):\n{env_help}\n\n"
        "See nspawnctl(1) and nspawnctl.yaml(5).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nspawnctl {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log every command and D-Bus failure; tracebacks on errors",
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        metavar="DIR",
        help="where NAME.yaml files live (default /etc/nspawnctl, or $NSPAWNCTL_CONFIG_DIR)",
    )
    parser.add_argument(
        "-H",
        "--host",
        action="append",
        metavar="[USER@]HOST[:PORT]",
        help="run the verb on that host over ssh; repeated: list or status of a fleet",
    )
    # Given by the client side of -H (remote.py): which file arguments it sent, and where.
    parser.add_argument("--client-files", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser)
    for module in _COMMAND_MODULES:
        module.register(sub)
    return parser


def verbs() -> list[str]:
    """Every verb the parser knows, for the documentation test."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup(args.debug)
    try:
        if args.host:
            # Checked here first (the command line is the same there), then run there.
            return remote.run(parser, args, argv)
        if args.client_files:
            remote.receive(parser, args)
        paths = Paths.from_env(config_dir=args.config_dir)
        if args.verb not in _PURE_VERBS:
            # A change a killed nspawnctl left half-done is finished or taken back first.
            recovery.settle(paths)
        return int(args.handler(args, paths))
    except NspawnctlError as err:
        if args.debug:
            log.exception("traceback")
        print(f"nspawnctl: error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("nspawnctl: interrupted", file=sys.stderr)
        return Exit.INTERRUPTED
    except OSError as err:
        # A file nspawnctl could not read or write: say which, not where in the code.
        if args.debug:
            log.exception("traceback")
        error = from_os_error(err)
        print(f"nspawnctl: error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return Exit.FAILED
    except Exception as err:  # a bug: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"nspawnctl: error: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        print("hint: run again with --debug for the traceback, and report it", file=sys.stderr)
        return Exit.FAILED
