"""`nspawnctl -H [USER@]HOST[:PORT] VERB ...`: the verb run by the nspawnctl of another
host, over the user's own OpenSSH (their ssh config, keys, agent and known_hosts), the
way `machinectl -H` reaches another host's machined.

One call is a few ssh sessions over one connection (ssh.py). In order:
1. ask the far nspawnctl its version: none, or one that speaks otherwise, is an error
   before anything changes there;
2. send the local files the command line names (commands.add_file) into a private
   directory there;
3. run the verb there, with a terminal if this side has one; its exit code is ours;
4. fetch the files it wrote, and remove the directory.
The far nspawnctl is told which of its arguments were sent (--client-files), and reads
those from the directory; every other argument means what it means there."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nspawnctl.commands import file_role
from nspawnctl.errors import Exit, NspawnctlError, OperationError, UsageError
from nspawnctl.screen import shown
from nspawnctl.ssh import (
    FILES_OPTION,
    SSH_FAILED,
    Connection,
    Destination,
    Sent,
    connected,
)

# Options of nspawnctl itself that take a value, as they may come before the verb.
_VALUED = frozenset({"-H", "--host", "--config-dir", FILES_OPTION})


# --- the command line ---------------------------------------------------------------


def verb_argv(argv: Sequence[str]) -> list[str]:
    """argv without its -H options: what the far nspawnctl is given."""
    kept: list[str] = []
    words = iter(argv)
    for word in words:
        name = word.split("=", 1)[0]
        if not word.startswith("-") or word == "--":
            return [*kept, word, *words]
        if name in ("-H", "--host"):
            if "=" not in word:
                next(words, None)
            continue
        if word.startswith("-H"):
            continue  # -Hhost
        kept.append(word)
        if name in _VALUED and "=" not in word:
            kept.append(next(words, ""))
    return kept


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[Any]:
    """The actions of the parsers the command line went through: nspawnctl's, the
    verb's, and a sub-verb's (`image export`)."""
    while True:
        yield from parser._actions
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            return
        parser = sub.choices[getattr(args, sub.dest)]


def _local_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Sent]:
    files: list[Sent] = []
    for action in _chosen(parser, args):
        role = file_role(action)
        value = getattr(args, action.dest, None)
        if role is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            local = Path(item)
            if role == "key" and not local.is_file():
                continue  # a key line, given as it is
            if role != "output" and not local.exists():
                raise UsageError(f"{item}: no such file here", hint="-H sends local files")
            if role == "output" and not local.absolute().parent.is_dir():
                raise UsageError(f"{item}: no such directory here for it")
            # Named by number, with the suffixes that say what it is (.tar.zst, .yaml).
            remote = f"{len(files)}{''.join(local.suffixes)}"
            kind = "output" if role == "output" else "input"
            files.append(Sent(local, remote, kind, follow=role == "config"))
    return files


def receive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """On the far side: the file arguments that came with the call, read from where they
    were put (--client-files maps each as the client gave it to its path here)."""
    given: Mapping[str, str] = json.loads(args.client_files)
    for action in _chosen(parser, args):
        value = getattr(args, action.dest, None)
        if file_role(action) is None or value is None:
            continue
        if isinstance(value, list):
            setattr(args, action.dest, [given.get(str(Path(v)), v) for v in value])
        elif str(value) in given:
            setattr(args, action.dest, Path(given[str(value)]))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    destinations = [Destination.parse(text) for text in args.host]
    verb = verb_argv(argv)
    if len(destinations) > 1:
        return fleet(destinations, args, verb)
    files = _local_files(parser, args)
    with connected(destinations[0]) as connection:
        connection.check_version()
        return _run_there(connection, verb, files)


def _run_there(connection: Connection, verb: Sequence[str], files: Sequence[Sent]) -> int:
    with connection.sent(files) as where:
        terminal = sys.stdin.isatty() and sys.stdout.isatty()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        code = connection.attached(connection.nspawnctl_argv(verb, where), terminal=terminal)
        if code == SSH_FAILED:
            raise OperationError(
                f"{connection.destination}: the connection was lost during the verb",
                hint="it may have finished there: see `nspawnctl -H "
                f"{connection.destination} list`",
            )
        if code == 0:
            for output in files:
                if output.role == "output":
                    connection.fetch(
                        Sent(output.local.absolute(), where[str(output.local)], "output")
                    )
        return code


# --- a fleet: one verb on several hosts ---------------------------------------------

_FLEET_VERBS = frozenset({"list", "status"})


def fleet(destinations: Sequence[Destination], args: argparse.Namespace, verb: list[str]) -> int:
    """`list` or `status` of every host, asked in parallel, as one table: a host that
    cannot be asked is a row of its own, and the exit code says so."""
    if args.verb not in _FLEET_VERBS:
        raise UsageError(
            f"`{args.verb}` takes one -H; several are for {' and '.join(sorted(_FLEET_VERBS))}",
            hint="run it once per host",
        )
    asked = [*verb[: verb.index(args.verb) + 1], "--json", *verb[verb.index(args.verb) + 1 :]]
    with ThreadPoolExecutor(max_workers=min(16, len(destinations))) as pool:
        answers = list(pool.map(lambda d: _ask(d, asked), destinations))
    rows: list[dict[str, Any]] = []
    for destination, (answer, error) in zip(destinations, answers, strict=True):
        # An answer with an error: `list` there read every YAML but a broken one.
        if isinstance(answer, list):
            rows += [{"host": str(destination), **row} for row in answer]
        elif answer is not None:
            rows.append({"host": str(destination), **answer})
        if error is not None:
            rows.append({"host": str(destination), "error": error})
    failed = any("error" in row for row in rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_fleet(rows, args.verb)
    return Exit.FAILED if failed else Exit.OK


def _ask(destination: Destination, verb: Sequence[str]) -> tuple[Any, str | None]:
    """One host's JSON answer (None if it gave none), and what went wrong there."""
    try:
        with connected(destination) as connection:
            connection.check_version()
            return connection.ask(verb)
    except NspawnctlError as err:
        return None, err.message.removeprefix(f"{destination}: ")


def _print_fleet(rows: Sequence[Mapping[str, Any]], verb: str) -> None:
    if verb == "status":
        header = ["HOST", "NAME", "SOCKET", "CONTAINER", "LISTEN"]

        def cells(r: Mapping[str, Any]) -> list[str]:
            return [
                r["name"],
                r["socket"]["state"],
                r["container"]["state"],
                ",".join(r["listen"]),
            ]

    else:
        header = ["HOST", "NAME", "SOCKET", "CONTAINER", "LISTEN", "ADDRESS", "IMAGE"]

        def cells(r: Mapping[str, Any]) -> list[str]:
            return [
                r["name"],
                r["socket"],
                r["container"],
                ",".join(r["listen"]),
                r["address"] or "-",
                r["image"],
            ]

    table = [header]
    for row in rows:
        if "error" in row:
            table.append([row["host"], f"error: {row['error']}"])
        else:
            table.append([row["host"], *(str(c) for c in cells(row))])
    # Shown as text: what a far host says must not act on the terminal.
    lines = [[shown(cell) for cell in line] for line in table]
    # An error row's one long cell does not widen its column.
    full = [line for line in lines if len(line) == len(header)]
    widths = [max(len(line[i]) for line in full) for i in range(len(header))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip())
