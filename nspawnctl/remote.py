"""`nspawnctl -H [USER@]HOST[:PORT] VERB ...`: the verb run by the nspawnctl of another
host, over the user's own OpenSSH (their ssh config, keys, agent and known_hosts), the
way `machinectl -H` reaches another host's machined.

One call is a few ssh sessions over one connection: the first ssh becomes the master of
a control socket in a private directory, the others ride on it, so a password or a
host-key question comes once. In order:
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
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nspawnctl import __version__
from nspawnctl.commands import file_role
from nspawnctl.errors import Exit, NspawnctlError, OperationError, UsageError
from nspawnctl.run import spawn
from nspawnctl.screen import shown

# What ssh needs of our environment: where its config and keys are, the agent, the
# terminal; the rest of it (LISTEN_FDS...) is not the far host's business.
_SSH_KEEP = ("HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK", "TERM", "DISPLAY", "SSH_ASKPASS")
# The far side's program: `sudo nspawnctl` or a venv's path, as rsync's --rsync-path.
REMOTE_COMMAND_VARIABLE = "NSPAWNCTL_REMOTE_COMMAND"
# ssh's own failures (no route, refused key) exit 255; nspawnctl's never do.
_SSH_FAILED = 255
# Options of nspawnctl itself that take a value, as they may come before the verb.
_VALUED = frozenset({"-H", "--host", "--config-dir", "--client-files"})
_FILES_OPTION = "--client-files"
_HOST = re.compile(r"[A-Za-z0-9._:%-]+")
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Destination:
    """[USER@]HOST[:PORT]; an IPv6 address with a port in brackets ([::1]:2222)."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Destination:
        user, at, rest = text.rpartition("@")
        port: str | None = None
        if rest.startswith("["):
            host, bracket, tail = rest[1:].partition("]")
            if not bracket or (tail and not tail.startswith(":")):
                raise _bad_destination(text, "an IPv6 address goes in brackets: [::1]:22")
            port = tail[1:] or None
        elif rest.count(":") == 1:
            host, _sep, port = rest.partition(":")
        else:
            host = rest  # a bare IPv6 address, or a name
        # A leading "-" would be an option of ssh's (-oProxyCommand=...), not a host.
        if not host or host.startswith("-") or not _HOST.fullmatch(host):
            raise _bad_destination(text, "HOST is a name or an address")
        if at and not _USER.fullmatch(user):
            raise _bad_destination(text, "USER is a login name")
        number = None
        if port is not None:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise _bad_destination(text, "PORT is a number from 1 to 65535")
            number = int(port)
        return cls(host, user or None, number)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and self.port else self.host
        return (
            (f"{self.user}@" if self.user else "") + host + (f":{self.port}" if self.port else "")
        )


def _bad_destination(text: str, hint: str) -> UsageError:
    return UsageError(f"-H {text!r}: not [USER@]HOST[:PORT]", hint=hint)


@dataclass(frozen=True)
class Sent:
    """A local file of the command line, and where it is on the far host."""

    local: Path
    remote: str
    role: str  # "input" or "output"


class Connection:
    """ssh sessions to one host over one connection; use as a context manager."""

    def __init__(self, destination: Destination, control_dir: Path) -> None:
        self.destination = destination
        self._control = control_dir / "c"
        self.command = shlex.split(os.environ.get(REMOTE_COMMAND_VARIABLE) or "nspawnctl")

    def argv(self, command: str, *, terminal: bool = False) -> list[str]:
        argv = ["ssh", "-t" if terminal else "-T", "-o", "ControlMaster=auto"]
        argv += ["-o", f"ControlPath={self._control}", "-o", "ControlPersist=60"]
        if self.destination.user:
            argv += ["-l", self.destination.user]
        if self.destination.port:
            argv += ["-p", str(self.destination.port)]
        # "--": the host can never be taken for an option; the command is one word, which
        # the far shell splits (ssh would join several with spaces anyway).
        return [*argv, "--", self.destination.host, command]

    def run(
        self, command: str, *, input: bytes | None = None, what: str
    ) -> subprocess.CompletedProcess[bytes]:
        """A command on the far host, its output captured; ssh's own failure raised."""
        pipe = subprocess.PIPE
        stdin = pipe if input is not None else subprocess.DEVNULL
        with spawn(
            self.argv(command), keep=_SSH_KEEP, stdin=stdin, stdout=pipe, stderr=pipe
        ) as proc:
            out, err = proc.communicate(input)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if done.returncode == _SSH_FAILED:
            raise self.unreachable(done.stderr.decode(errors="replace"), what)
        return done

    def unreachable(self, stderr: str, what: str) -> OperationError:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else "ssh failed"
        return OperationError(
            f"{self.destination}: {what}: {why}",
            hint=f"check `ssh {self.destination.host}` on its own: nspawnctl -H uses "
            "your ssh config, keys and known_hosts",
        )

    def remote(self, args: Sequence[str]) -> str:
        return shlex.join([*self.command, *args])

    def check_version(self) -> None:
        """The far nspawnctl, or a clear error before anything is done there."""
        program = shlex.quote(self.command[0])
        probe = f"command -v {program} >/dev/null 2>&1 || exit 127; {self.remote(['--version'])}"
        done = self.run(probe, what="connecting")
        found = done.stdout.decode(errors="replace").strip()
        if done.returncode == 127:
            raise OperationError(
                f"{self.destination} has no {self.command[0]!r} on its PATH",
                hint=f"install nspawnctl {__version__} there, or name it with "
                f"{REMOTE_COMMAND_VARIABLE}=/path/to/nspawnctl",
            )
        version = found.removeprefix("nspawnctl ").strip()
        if done.returncode != 0 or not compatible(version):
            raise OperationError(
                f"{self.destination} has nspawnctl {version or '(unknown version)'}, "
                f"this is {__version__}: -H needs the same MAJOR.MINOR on both sides",
                hint=f"install nspawnctl {__version__} on {self.destination.host}",
            )

    def send(self, files: Sequence[Sent]) -> str:
        """The inputs copied into a new private directory there; its path. They go as
        one tar stream into ssh, never whole in memory (an archive to import may be big)."""
        make = 'd=$(mktemp -d /var/tmp/nspawnctl-client.XXXXXXXX) && echo "$d" && '
        unpack = 'tar -x -f - -C "$d" --no-same-owner'
        pipe = subprocess.PIPE
        argv = self.argv(make + unpack)
        with spawn(argv, keep=_SSH_KEEP, stdin=pipe, stdout=pipe, stderr=pipe) as proc:
            assert proc.stdin is not None
            try:
                # The user's own files: a link in them means what it points at.
                with tarfile.open(fileobj=proc.stdin, mode="w|", dereference=True) as tar:
                    for sent in files:
                        if sent.role == "input":
                            tar.add(sent.local, arcname=Path(sent.remote).name)
            except BrokenPipeError:
                pass  # the far side gave up: its stderr says why
            out, err = proc.communicate()  # ends the stream: closes ssh's stdin
        stderr = err.decode(errors="replace")
        if proc.returncode == _SSH_FAILED:
            raise self.unreachable(stderr, "sending files")
        directory: list[str] = out.decode(errors="replace").strip().splitlines()[:1]
        if proc.returncode != 0 or not directory:
            raise OperationError(f"{self.destination}: sending files failed: {stderr.strip()}")
        return directory[0]

    def fetch(self, sent: Sent) -> None:
        """An output of the verb, written beside its local name and renamed into place."""
        target = sent.local
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as out:
                argv = self.argv(shlex.join(["cat", "--", sent.remote]))
                with spawn(argv, keep=_SSH_KEEP, stdout=out, stderr=subprocess.PIPE) as proc:
                    _out, err = proc.communicate()
            if proc.returncode != 0:
                raise OperationError(
                    f"{self.destination}: fetching {target}: {err.decode(errors='replace').strip()}"
                )
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)

    def close(self) -> None:
        """The master connection ended now, not when ControlPersist= runs out."""
        argv = ["ssh", "-o", f"ControlPath={self._control}", "-O", "exit"]
        argv += ["--", self.destination.host]
        with contextlib.suppress(NspawnctlError):
            spawn(argv, keep=_SSH_KEEP, stderr=subprocess.DEVNULL).wait()


def compatible(version: str) -> bool:
    """The same MAJOR.MINOR: the command line and --client-files mean the same there."""
    return version.split(".")[:2] == __version__.split(".")[:2]


@contextlib.contextmanager
def connected(destination: Destination) -> Iterator[Connection]:
    with tempfile.TemporaryDirectory(prefix="nspawnctl-ssh-") as control:
        connection = Connection(destination, Path(control))
        try:
            yield connection
        finally:
            connection.close()


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
            files.append(Sent(local, remote, "output" if role == "output" else "input"))
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
    directory = connection.send(files) if files else ""
    try:
        sent = {str(f.local): f"{directory}/{f.remote}" for f in files}
        if sent:
            verb = [_FILES_OPTION, json.dumps(sent), *verb]
        terminal = sys.stdin.isatty() and sys.stdout.isatty()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        argv = connection.argv(connection.remote(verb), terminal=terminal)
        with spawn(argv, keep=_SSH_KEEP, stdin=None) as proc:
            code = proc.wait()
        if code == _SSH_FAILED:
            raise OperationError(
                f"{connection.destination}: the connection was lost during the verb",
                hint="it may have finished there: see `nspawnctl -H "
                f"{connection.destination} list`",
            )
        if code == 0:
            for output in files:
                if output.role == "output":
                    connection.fetch(
                        Sent(output.local.absolute(), sent[str(output.local)], "output")
                    )
        return code
    finally:
        if directory:
            connection.run(shlex.join(["rm", "-rf", "--", directory]), what="cleaning up")


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
        if error is not None:
            rows.append({"host": str(destination), "error": error})
        elif isinstance(answer, list):
            rows += [{"host": str(destination), **row} for row in answer]
        else:
            rows.append({"host": str(destination), **answer})
    failed = any("error" in row for row in rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_fleet(rows, args.verb)
    return Exit.FAILED if failed else Exit.OK


def _ask(destination: Destination, verb: Sequence[str]) -> tuple[Any, str | None]:
    """One host's JSON answer, or what went wrong."""
    try:
        with connected(destination) as connection:
            connection.check_version()
            done = connection.run(connection.remote(verb), what="asking")
            if done.returncode not in (Exit.OK, Exit.FAILED) or not done.stdout.strip():
                lines = done.stderr.decode(errors="replace").strip().splitlines()
                return None, (lines[-1] if lines else f"exit code {done.returncode}")
            return json.loads(done.stdout), None
    except NspawnctlError as err:
        return None, err.message
    except ValueError:
        return None, "its answer is not JSON"


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
