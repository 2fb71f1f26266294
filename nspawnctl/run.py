"""Every subprocess nspawnctl starts goes through `spawn`, mostly by way of `run` (or
`run_interactive`, `run_lines`, `run_relayed`)."""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from nspawnctl.errors import OperationError
from nspawnctl.log import log

Argv = Sequence[str | Path]

# Children get a known environment, not whatever the caller's shell exported:
# locale-dependent output and stray variables (LISTEN_FDS!) change behaviour.
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _environment(extra: Mapping[str, str] | None, keep: Sequence[str] = ()) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", _PATH), "LANG": "C.UTF-8"}
    env.update({k: os.environ[k] for k in keep if k in os.environ})
    env.update(extra or {})
    return env


def spawn(
    argv: Argv,
    *,
    env: Mapping[str, str] | None = None,
    keep: Sequence[str] = (),
    **popen: Any,
) -> subprocess.Popen[Any]:
    """The one place a process is started: its command line echoed with --debug, a
    known environment (`keep`: variables of ours it also gets), stdin from /dev/null
    unless said otherwise, and a missing program an error of ours."""
    args = [str(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    popen.setdefault("stdin", subprocess.DEVNULL)
    try:
        return subprocess.Popen(args, env=_environment(env, keep), **popen)
    except FileNotFoundError:
        raise OperationError(
            f"{args[0]}: command not found", hint="install it, see README.md"
        ) from None


def run(
    argv: Argv,
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """Run argv, capturing its output. With `progress`, output lines are streamed to it
    as they come (stderr merged into stdout). Raises OperationError on failure if `check`."""
    args = [str(a) for a in argv]
    if progress is not None:
        proc = _stream(args, env, progress)
    else:
        stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
        pipe = subprocess.PIPE
        with spawn(
            args, env=env, stdin=stdin, stdout=pipe, stderr=pipe, text=True, pass_fds=pass_fds
        ) as child:
            try:
                out, err = child.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                raise OperationError(f"{args[0]} did not finish within {timeout} s") from None
        proc = subprocess.CompletedProcess(args, child.returncode, out, err)
    if check and proc.returncode != 0:
        raise command_failed(args, proc.returncode, proc.stderr or proc.stdout)
    return proc


def _stream(
    args: list[str], env: Mapping[str, str] | None, progress: Callable[[str], None]
) -> subprocess.CompletedProcess[str]:
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with spawn(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            progress(line)
    return subprocess.CompletedProcess(args, proc.returncode, "".join(tail), "")


StreamName = Literal["stdout", "stderr"]
LineSink = Callable[[StreamName, str], None]

# A line longer than this is handed on in pieces of this size: a command that never
# ends its line must not make nspawnctl hold all of it.
MAX_LINE = 64 * 1024
# Once the command has exited, what it wrote is in the pipes already: read on only while
# more comes at once (DRAIN_IDLE), and for DRAIN_SECONDS at most. Whoever still holds the
# pipes then (a process the command handed them to) gets EPIPE, and does not keep
# nspawnctl waiting for an end of file that never comes.
DRAIN_IDLE = 0.1
DRAIN_SECONDS = 2.0


def run_lines(
    argv: Argv,
    on_line: LineSink,
    *,
    env: Mapping[str, str] | None = None,
    max_line: int = MAX_LINE,
) -> int:
    """Run argv with stdin from /dev/null and hand each line of its stdout and of its
    stderr, without the newline, to `on_line` as it comes; return the exit code. The
    streams stay apart, so stderr can go on being stderr. A line longer than `max_line`
    bytes comes in pieces; a last line without a newline comes too. Returns when argv
    has exited and its pipes are drained (boundedly), not when every copy of the pipes
    is closed. Safe to call from threads."""
    proc = spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    splitters = {
        proc.stdout.fileno(): _Lines("stdout", on_line, max_line),
        proc.stderr.fileno(): _Lines("stderr", on_line, max_line),
    }

    def take(fd: int, data: bytes) -> None:
        splitters[fd].feed(data)

    try:
        _relay(proc, {fd: take for fd in splitters})
        for splitter in splitters.values():
            splitter.end()
    finally:
        # Closed, so that whoever writes to them (the command, or a process it handed the
        # pipes to) gets EPIPE instead of waiting on a full pipe for ever. If on_line
        # failed (our own stdout closed, say), the command is ended too.
        proc.stdout.close()
        proc.stderr.close()
        _end(proc)
    return proc.returncode


class _Lines:
    """Splits a stream's bytes into lines of at most `max_line` bytes, decoded."""

    def __init__(self, stream: StreamName, on_line: LineSink, max_line: int) -> None:
        self.stream, self.on_line, self.max_line = stream, on_line, max_line
        self.buffer = bytearray()
        self.cut = False  # pieces of the line in the buffer were handed on already

    def feed(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while (end := self.buffer.find(b"\n", start)) >= 0:
            # The end of a line whose pieces went before is no line of its own.
            if end > start or not self.cut:
                self._pieces(self.buffer[start:end])
            self.cut = False
            start = end + 1
        del self.buffer[:start]
        if len(self.buffer) >= self.max_line:
            cut = _char_boundary(self.buffer, len(self.buffer) // self.max_line * self.max_line)
            self._pieces(self.buffer[:cut])
            del self.buffer[:cut]
            self.cut = True

    def end(self) -> None:
        if self.buffer:
            self._pieces(self.buffer)
            self.buffer.clear()

    def _pieces(self, line: bytearray) -> None:
        start = 0
        while True:
            cut = _char_boundary(line, start + self.max_line)
            # "replace": a command's binary output must not end the reading.
            self.on_line(self.stream, line[start:cut].decode("utf-8", errors="replace"))
            if cut >= len(line):
                return
            start = cut


def _char_boundary(data: bytearray, at: int) -> int:
    """`at`, moved back (by up to 3 bytes) off the middle of a UTF-8 character."""
    if at >= len(data):
        return len(data)
    for back in range(4):
        if at - back > 0 and data[at - back] & 0xC0 != 0x80:
            return at - back
    return at


def _relay(
    proc: subprocess.Popen[bytes],
    readers: Mapping[int, Callable[[int, bytes], None]],
    feed: tuple[int, int] | None = None,
) -> None:
    """Hand what comes on each of `readers`' pipes to its function, and with `feed`
    (source, pipe) copy the source's bytes into the pipe (argv's stdin), until `proc`
    has exited and the pipes are drained, within DRAIN_SECONDS. One thread: nothing
    blocks on a pipe nobody empties, or on a read the command's end makes pointless."""
    exited = os.pidfd_open(proc.pid)
    # poll, not epoll: a source may be a regular file (stdin `< FILE`), which epoll refuses.
    with selectors.PollSelector() as selector, contextlib.closing(_Feed(selector, feed)) as stdin:
        selector.register(exited, selectors.EVENT_READ, "exited")
        for fd in readers:
            selector.register(fd, selectors.EVENT_READ, "reader")
        drain_until: float | None = None
        try:
            while True:
                now = time.monotonic()
                if drain_until is not None:  # it has exited: drain
                    reading = any(k.data == "reader" for k in selector.get_map().values())
                    if not reading or now >= drain_until:
                        return
                timeout = None if drain_until is None else min(DRAIN_IDLE, drain_until - now)
                events = selector.select(timeout)
                if not events and drain_until is not None:
                    return  # nothing more comes at once
                for key, _mask in events:
                    fd = int(key.fd)
                    if fd not in selector.get_map():
                        continue  # dropped by an earlier event of this round
                    if key.data == "exited":
                        selector.unregister(fd)
                        proc.wait()
                        # It has ended: nothing more goes to its stdin, which a process it
                        # handed stdin to could go on reading.
                        stdin.close()
                        drain_until = time.monotonic() + DRAIN_SECONDS
                    elif key.data == "reader":
                        data = os.read(fd, 65536)
                        if not data:
                            selector.unregister(fd)
                        else:
                            readers[fd](fd, data)
                    else:
                        stdin.ready(fd)
        finally:
            os.close(exited)


class _Feed:
    """Copies bytes from a source fd (nspawnctl's stdin) into a pipe (the command's
    stdin), through the caller's selector: reads only when what it read before is
    written, so a command that does not read makes nspawnctl read no more."""

    def __init__(self, selector: selectors.BaseSelector, feed: tuple[int, int] | None) -> None:
        self.selector = selector
        self.source, self.pipe = feed or (-1, -1)
        self.pending = b""
        if self.pipe >= 0:
            os.set_blocking(self.pipe, False)  # our own pipe: never the caller's fds
            selector.register(self.source, selectors.EVENT_READ, "feed")

    def ready(self, fd: int) -> None:
        if fd == self.source:
            data = os.read(self.source, 65536)
            self.selector.unregister(self.source)
            if not data:
                self.source = -1  # end of input: the command sees it once the rest is written
            self.pending = data
        try:
            written = os.write(self.pipe, self.pending) if self.pending else 0
        except BlockingIOError:
            written = 0
        except BrokenPipeError:  # the command does not read its stdin any more
            self.close()
            return
        self.pending = self.pending[written:]
        if self.pending:
            self._watch(self.pipe, selectors.EVENT_WRITE)
        else:
            self._unwatch(self.pipe)
            if self.source >= 0:
                self._watch(self.source, selectors.EVENT_READ)
            else:
                self.close()

    def _watch(self, fd: int, events: int) -> None:
        if fd not in self.selector.get_map():
            self.selector.register(fd, events, "feed")

    def _unwatch(self, fd: int) -> None:
        if fd in self.selector.get_map():
            self.selector.unregister(fd)

    def close(self) -> None:
        """Stop: read no more of the source (left open: it is the caller's) and close
        the pipe, so the command (or whoever holds its stdin) gets an end of file."""
        if self.source >= 0:
            self._unwatch(self.source)
            self.source = -1
        if self.pipe >= 0:
            self._unwatch(self.pipe)
            os.close(self.pipe)
            self.pipe = -1


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Reap proc; end it first if it still runs (nspawnctl gives up on it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_relayed(argv: Argv, *, env: Mapping[str, str] | None = None) -> int:
    """Run argv with pipes of nspawnctl's own as its stdin, stdout and stderr, copying
    nspawnctl's stdin into the one and the others' bytes, unchanged, to nspawnctl's
    stdout and stderr; return its exit code once it has exited and its output is
    drained (boundedly). argv never gets nspawnctl's own file descriptors (a terminal,
    the caller's pipe or file), so it cannot hand them on to a process that keeps them
    after it has exited: all it ever holds are pipes that are closed when it ends."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # what nspawnctl printed goes first
    pipe = subprocess.PIPE
    proc = spawn(argv, env=env, stdin=pipe, stdout=pipe, stderr=pipe)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    # The pipe's write end is _Feed's to close, once input ends or the command does.
    stdin_pipe = os.dup(proc.stdin.fileno())
    proc.stdin.close()
    out = {proc.stdout.fileno(): sys.stdout.fileno(), proc.stderr.fileno(): sys.stderr.fileno()}

    def copy(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(out[fd], view) :]

    try:
        _relay(proc, dict.fromkeys(out, copy), feed=(sys.stdin.fileno(), stdin_pipe))
    finally:
        proc.stdout.close()
        proc.stderr.close()
        _end(proc)
    return proc.returncode


def command_failed(args: Sequence[str], code: int, output: str) -> OperationError:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    detail = lines[-1].strip() if lines else "no output"
    return OperationError(
        f"{shlex.join(args)[:200]} failed (exit code {code}): {detail}",
        hint="run again with --debug to see every command",
    )


def run_interactive(argv: Argv, *, env: Mapping[str, str] | None = None) -> int:
    """Run argv on the caller's terminal (stdin, stdout, stderr passed through)."""
    keep = ("TERM", "HOME", "PAGER", "SYSTEMD_PAGER")
    with spawn(argv, env=env, keep=keep, stdin=None) as proc:
        return proc.wait()
