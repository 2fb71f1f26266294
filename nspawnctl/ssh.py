"""ssh to another host's nspawnctl: a destination, and a connection that runs commands
there, sends files and fetches them, over the user's own OpenSSH (their ssh config, keys,
agent and known_hosts). One Connection is one SSH connection: the first ssh becomes the
master of a control socket in a private directory and the others ride on it, so that a
password or a host-key question comes once. Used by -H (remote.py) and migrate."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nspawnctl import __version__
from nspawnctl.errors import NspawnctlError, OperationError, UsageError
from nspawnctl.run import spawn

# What ssh needs of our environment: where its config and keys are, the agent, the
# terminal; the rest of it (LISTEN_FDS...) is not the far host's business.
_SSH_KEEP = ("HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK", "TERM", "DISPLAY", "SSH_ASKPASS")
# The far side's program: `sudo nspawnctl` or a venv's path, as rsync's --rsync-path.
REMOTE_COMMAND_VARIABLE = "NSPAWNCTL_REMOTE_COMMAND"
# ssh's own failures (no route, refused key) exit 255; nspawnctl's never do.
SSH_FAILED = 255
# Tells the far nspawnctl which of its file arguments were sent, and where they are.
FILES_OPTION = "--client-files"
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
    follow: bool = False  # a directory's links are sent as what they lead to (apply DIR)


class Connection:
    """ssh sessions to one host over one connection; use as a context manager."""

    def __init__(self, destination: Destination, control_dir: Path) -> None:
        self.destination = destination
        self._control = control_dir / "c"
        self.command = shlex.split(os.environ.get(REMOTE_COMMAND_VARIABLE) or "nspawnctl")

    def _ssh(self, *, terminal: bool = False) -> list[str]:
        """ssh and its options, up to the host."""
        argv = ["ssh", "-t" if terminal else "-T", "-o", "ControlMaster=auto"]
        argv += ["-o", f"ControlPath={self._control}", "-o", "ControlPersist=60"]
        # Every wait on the far host is bounded: a host that vanishes (a cable, a crash:
        # no reset ever comes) is given up after a minute, not waited on for ever.
        argv += ["-o", "ConnectTimeout=30", "-o", "ServerAliveInterval=15"]
        argv += ["-o", "ServerAliveCountMax=4"]
        if self.destination.user:
            argv += ["-l", self.destination.user]
        if self.destination.port:
            argv += ["-p", str(self.destination.port)]
        return argv

    def argv(self, command: str, *, terminal: bool = False) -> list[str]:
        # "--": the host can never be taken for an option; the command is one word, which
        # the far shell splits (ssh would join several with spaces anyway).
        return [*self._ssh(terminal=terminal), "--", self.destination.host, command]

    def has(self, program: str) -> bool:
        """Whether the far host has `program` on its PATH."""
        probe = f"command -v {shlex.quote(program)} >/dev/null 2>&1"
        return self.run(probe, what=f"looking for {program}").returncode == 0

    @contextlib.contextmanager
    def scratch(self) -> Iterator[str]:
        """A new private directory there for the body (its path), removed after."""
        made = self.run("mktemp -d /var/tmp/nspawnctl-client.XXXXXXXX", what="mktemp")
        directory = made.stdout.decode(errors="replace").strip()
        if made.returncode != 0 or not directory.startswith("/var/tmp/nspawnctl-client."):
            raise OperationError(f"{self.destination}: mktemp: {made.stderr.decode().strip()}")
        try:
            yield directory
        finally:
            with contextlib.suppress(NspawnctlError):
                self.run(shlex.join(["rm", "-rf", "--", directory]), what="cleaning up")

    def sync(self, local: Path, remote: str) -> int:
        """The file `local` made the same as `remote` there by rsync over this connection:
        of a file that is there already, only the blocks that differ travel. The bytes
        that went (rsync's --stats)."""
        host = self.destination.host
        target = f"[{host}]:{remote}" if ":" in host else f"{host}:{remote}"
        # --ignore-times: never skipped for having the size and time it had; the far rsync
        # writes a new file and renames it over the old one when it is whole.
        argv = ["rsync", "--ignore-times", "--compress", "--stats", "-e", shlex.join(self._ssh())]
        argv += ["--", str(local), target]
        pipe = subprocess.PIPE
        with spawn(
            argv, keep=_SSH_KEEP, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe
        ) as proc:
            out, err = proc.communicate()
        if proc.returncode != 0:
            lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
            # 255 and 12 (its stream cut) are ssh's; else rsync says what (a full disk).
            cut = proc.returncode in (12, SSH_FAILED)
            raise OperationError(
                f"{self.destination}: rsync of {local.name}: {lines[0] if lines else 'failed'}",
                hint=f"check `ssh {host}` on its own" if cut else None,
            )
        found = re.search(rb"^Total bytes sent: ([0-9,.]+)", out, re.MULTILINE)
        return int(re.sub(rb"[,.]", b"", found.group(1))) if found else 0

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
        if done.returncode == SSH_FAILED:
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
        if done.returncode != 0:
            # `sudo nspawnctl` whose sudo wants a password says so here, for one.
            said, _hint = far_said(done)
            raise OperationError(
                f"{self.destination}: `{shlex.join([*self.command, '--version'])}` failed "
                f"there: {said}",
                hint=f"run it there on its own; a {REMOTE_COMMAND_VARIABLE} with sudo needs "
                "sudo without a password for it (ssh gives it no terminal)",
            )
        version = found.removeprefix("nspawnctl ").strip()
        if not compatible(version):
            raise OperationError(
                f"{self.destination} has nspawnctl {version or '(unknown version)'}, "
                f"this is {__version__}: -H needs the same MAJOR.MINOR on both sides",
                hint=f"install nspawnctl {__version__} on {self.destination.host}",
            )

    def send(self, files: Sequence[Sent]) -> str:
        """The inputs copied into a new private directory there; its path. They go as
        one tar stream into ssh, never whole in memory (an archive to import may be big)."""
        make = 'd=$(mktemp -d /var/tmp/nspawnctl-client.XXXXXXXX) && echo "$d" && '
        # A tar that fails (a full disk, a cut stream) leaves nothing behind there.
        unpack = 'tar -x -f - -C "$d" || { rm -rf -- "$d"; exit 1; }'
        pipe = subprocess.PIPE
        argv = self.argv(make + unpack)
        with spawn(argv, keep=_SSH_KEEP, stdin=pipe, stdout=pipe, stderr=pipe) as proc:
            assert proc.stdin is not None
            try:
                # The path given is the user's: where it leads is meant. What is inside a
                # directory goes as it is: a root filesystem's links are its own, never
                # this machine's files (etc/alternatives, lib -> usr/lib), and owners stay.
                with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                    for sent in files:
                        if sent.role == "input":
                            _add(tar, sent)
            except BrokenPipeError:
                pass  # the far side gave up: its stderr says why
            out, err = proc.communicate()  # ends the stream: closes ssh's stdin
        stderr = err.decode(errors="replace")
        if proc.returncode == SSH_FAILED:
            raise self.unreachable(stderr, "sending files")
        directory: list[str] = out.decode(errors="replace").strip().splitlines()[:1]
        if proc.returncode != 0 or not directory:
            raise OperationError(f"{self.destination}: sending files failed: {stderr.strip()}")
        return directory[0]

    def attached(self, command: str, *, terminal: bool) -> int:
        """A command there on our own stdin, stdout and stderr; its exit code."""
        with spawn(self.argv(command, terminal=terminal), keep=_SSH_KEEP, stdin=None) as proc:
            return proc.wait()

    def nspawnctl_argv(self, verb: Sequence[str], sent: dict[str, str]) -> str:
        """The far command line of a verb, told where the files it names were put."""
        return self.remote([FILES_OPTION, json.dumps(sent), *verb] if sent else verb)

    @contextlib.contextmanager
    def sent(self, files: Sequence[Sent]) -> Iterator[dict[str, str]]:
        """The inputs among `files` sent into a private directory there for the body, and
        removed after; yields where each is there, by its local name."""
        if not files:
            yield {}
            return
        directory = self.send(files)
        remove = shlex.join(["rm", "-rf", "--", directory])
        try:
            yield {str(f.local): f"{directory}/{f.remote}" for f in files}
        except BaseException:
            # What went wrong is told, not that the cleaning up failed after it too.
            with contextlib.suppress(NspawnctlError):
                self.run(remove, what="cleaning up")
            raise
        self.run(remove, what="cleaning up")

    def call(self, verb: Sequence[str], files: Sequence[Sent] = ()) -> str:
        """A verb of the far nspawnctl, with the inputs it names sent first; its output,
        or its own error raised as ours."""
        with self.sent(files) as where:
            return self.call_sent(verb, where)

    def call_sent(self, verb: Sequence[str], where: dict[str, str]) -> str:
        """A verb of the far nspawnctl whose files were sent already (`sent`)."""
        done = self.run(self.nspawnctl_argv(verb, where), what=verb[0])
        if done.returncode != 0:
            raise self.failed(done)
        return done.stdout.decode(errors="replace")

    def ask(self, verb: Sequence[str]) -> tuple[Any, str | None]:
        """The JSON answer of a --json verb there, and the far nspawnctl's own error if
        it exited 1 all the same: `list` answers for every container and exits 1 when
        some other YAML there is broken. No answer is raised as its error."""
        done = self.run(self.remote(verb), what=verb[0])
        if done.returncode in (0, 1) and done.stdout.strip():
            try:
                answer = json.loads(done.stdout)
            except ValueError:
                raise OperationError(
                    f"{self.destination}: {verb[0]}: its answer is not JSON"
                ) from None
            return answer, (far_said(done)[0] if done.returncode else None)
        raise self.failed(done)

    def failed(self, done: subprocess.CompletedProcess[bytes]) -> OperationError:
        """What a command there said when it failed, as our error."""
        said, hint = far_said(done)
        return OperationError(f"{self.destination}: {said}", hint=hint)

    def fetch(self, sent: Sent) -> None:
        """An output of the verb, written beside its local name and renamed into place."""
        target = sent.local
        # A name nobody can guess or plant a link at (O_EXCL), in the target's directory.
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        partial = Path(name)
        try:
            with open(fd, "wb") as out:
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


def _add(tar: tarfile.TarFile, sent: Sent) -> None:
    name = Path(sent.remote).name
    top = sent.local.resolve()
    if not (sent.follow and top.is_dir()):
        tar.add(top, arcname=name)
        return
    tar.add(top, arcname=name, recursive=False)
    # What apply reads there, as this machine's nspawnctl reads it here, and nothing
    # else: a link to ~/.ssh beside them stays here.
    # A dangling link or a directory goes as it is, for the far apply to refuse as this
    # one would (left out, it would look removed from DIR to --prune).
    for entry in sorted(top.glob("*.yaml")):
        if not entry.name.startswith("."):
            found = entry.resolve() if entry.is_file() else entry
            tar.add(found, arcname=f"{name}/{entry.name}", recursive=False)


def far_said(done: subprocess.CompletedProcess[bytes]) -> tuple[str, str | None]:
    """The far nspawnctl's own error and hint; else the last line it wrote."""
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    message = next((x for x in lines if x.startswith("nspawnctl: error: ")), None)
    hint = next((x for x in lines if x.startswith("hint: ")), None)
    if message is not None:
        said = message.removeprefix("nspawnctl: error: ")
    else:
        said = lines[-1] if lines else f"exit code {done.returncode}"
    return said, hint.removeprefix("hint: ") if hint else None


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
