"""Journals a guest may have forged, read so that each entry is told by where it lies.

Every field of a container's journal is the guest's to write: bound into the guest, its
root owns `JOURNAL_DIR/MACHINE-ID` on the host and can put
any file there, with any `_MACHINE_ID`, `_HOSTNAME`, `_SYSTEMD_UNIT` or message in it.
Fields therefore never say whose an entry is. What the guest cannot choose is the
directory: the host made it, in a host-owned parent, named by the machine-id the host
keeps. So each source is read on its own, one journalctl each, and labelled by nspawnctl:

- a container: only the regular `*.journal` files directly in its own directory, each
  opened here (O_NOFOLLOW, fstat'ed regular) and handed over as `/proc/self/fd/N`.
  `journalctl --directory` follows a symlink named `x.journal` (measured: a link to the
  host's `system.journal` showed the host's entries as the guest's), and descends into
  subdirectories named like machine-ids; both are the guest's to plant.
- the host: journalctl's default, local-only, which opens only `JOURNAL_DIR/<the
  host's machine-id>` (and the runtime journal in /run): root's directories, which no
  guest can write into.

The sources are merged here by `__REALTIME_TIMESTAMP` (itself the guest's to choose for
its own entries: a guest can sort its lines anywhere, never put them under another
name). Every wait is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import heapq
import json
import os
import re
import select
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from nspawnctl.errors import OperationError
from nspawnctl.log import log
from nspawnctl.run import run, spawn
from nspawnctl.screen import shown

# The host's label in JSON: machinectl's name for the host, and no container's name (a
# machine name cannot start with a dot).
HOST = ".host"
# The field nspawnctl adds to each JSON entry. Two underscores, as journalctl's own
# `__CURSOR`: not one of the entry's fields; any such field an entry brings is replaced.
SOURCE_FIELD = "__NSPAWNCTL_SOURCE"

FORMATS = ("short", "short-iso", "short-precise", "short-unix", "cat", "json")

MACHINE_ID = re.compile(r"[0-9a-f]{32}\Z")
# A cursor as journalctl writes it: `s=HEX;i=HEX;b=HEX;m=HEX;t=HEX;x=HEX`. It is made from
# fields of the (guest's) file, and goes back to journalctl as --after-cursor=.
_CURSOR = re.compile(r"[a-z]=[0-9a-f]{1,64}(;[a-z]=[0-9a-f]{1,64}){0,15}\Z")

# A journal file starts with this signature; anything else is no journal (a zero-filled
# or sparse file, a copy of some other file), and `journalctl --file=` fails on the whole
# set when one file is bad, so such files are left out before it runs.
_SIGNATURE = b"LPKSHHRH"
# journald keeps a few dozen files per directory (SystemMaxFiles=100); a directory with
# more is a guest's doing. The rest are left out, with a warning.
MAX_FILES = 256
# One entry of `-o json --all` per line. journald's own lines are at most 48 KiB
# (LineMax=); a forged file can hold an entry of any size. Longer ones are skipped.
MAX_LINE = 1 << 20
# History: a journalctl that prints nothing for this long is stuck (it never is on a
# sound file: it reads at disk speed) and is ended, its source reported.
IDLE_TIMEOUT = 30.0
# Follow: how often a container's directory is looked at for new entries (see follow()).
POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class Source:
    """One place entries are read from, and the name its entries are shown under."""

    label: str  # a container's name, or HOST
    directory: Path | None = None  # a container's journal directory; None: the host's
    matches: tuple[str, ...] = ()  # journalctl matches (the host's entries about units)


@dataclass(frozen=True, order=True)
class Entry:
    realtime: int
    source: str = field(compare=False)
    fields: dict[str, object] = field(compare=False, repr=False)


@dataclass
class Problems:
    """What went wrong while reading, reported on stderr at the end; never any content."""

    warnings: list[str] = field(default_factory=list)
    failed: bool = False  # a source could not be read (in part): exit code 1

    def warn(self, text: str, *, failed: bool = False) -> None:
        self.warnings.append(text)
        self.failed = self.failed or failed
        log.warning("warning: %s", text)


# ---------------------------------------------------------------- pure: parse and show


def field_text(value: object) -> str | None:
    """A field of journalctl's JSON as text: a string; a list of byte values (a field
    that is not UTF-8); or a list of either (a field the entry holds more than once:
    the first is shown). Undecodable bytes stay visible through shown() as \\udcXX."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(b, int) and 0 <= b <= 255 for b in value):
            return bytes(value).decode("utf-8", errors="surrogateescape")
        return field_text(value[0])
    return None


def parse_entry(line: bytes, source: str) -> Entry | None:
    """One line of `journalctl -o json`, or None if it is not a journal entry."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    stamp = data.get("__REALTIME_TIMESTAMP")
    if not (isinstance(stamp, str) and stamp.isascii() and stamp.isdigit() and len(stamp) < 20):
        return None
    return Entry(int(stamp), source, data)


def cursor_of(entry: Entry) -> str | None:
    cursor = entry.fields.get("__CURSOR")
    return cursor if isinstance(cursor, str) and _CURSOR.match(cursor) else None


def _timestamp(realtime: int, fmt: str) -> str:
    seconds, micro = divmod(realtime, 1_000_000)
    if fmt == "short-unix":
        return f"{seconds}.{micro:06d}"
    try:
        when = datetime.datetime.fromtimestamp(seconds).astimezone()
    except (OverflowError, ValueError, OSError):  # a forged stamp out of any calendar
        return f"@{seconds}.{micro:06d}"
    if fmt == "short-iso":
        return when.isoformat(timespec="seconds")
    if fmt == "short-precise":
        return when.strftime("%b %d %H:%M:%S") + f".{micro:06d}"
    return when.strftime("%b %d %H:%M:%S")


def format_entry(entry: Entry, fmt: str, label: str) -> str:
    """An entry as one or more lines (no final newline). In the human formats, every
    string of the entry goes through shown(); `label` is nspawnctl's own."""
    if fmt == "json":
        data = dict(entry.fields)
        data[SOURCE_FIELD] = entry.source
        # ensure_ascii: control characters and anything else non-ASCII become \\u escapes.
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    fields = entry.fields
    message = field_text(fields.get("MESSAGE"))
    if message is None:
        message = "[no message]" if "MESSAGE" not in fields else "[message not shown]"
    lines = message.removesuffix("\n").split("\n")
    if fmt == "cat":
        return "\n".join(shown(line) for line in lines)
    ident = field_text(fields.get("SYSLOG_IDENTIFIER")) or field_text(fields.get("_COMM"))
    pid = field_text(fields.get("_PID")) or field_text(fields.get("SYSLOG_PID"))
    prefix = f"{_timestamp(entry.realtime, fmt)} {shown(label)} {shown(ident or 'unknown')}"
    if pid:
        prefix += f"[{shown(pid)}]"
    prefix += ": "
    # As journalctl: further lines of a message are indented under the first, so none
    # of them can pass for an entry of its own.
    indent = " " * len(prefix)
    return "\n".join((prefix if i == 0 else indent) + shown(line) for i, line in enumerate(lines))


def relabel(entry: Entry, console_units: Mapping[str, str]) -> Entry:
    """A host entry written by a container's nspawn process is under that container's
    name: the process relays the guest's console, so its text is the guest's. Only the
    host's entries are looked at: there `_SYSTEMD_UNIT` is journald's, from the
    writer's cgroup; in a guest's journal it is whatever the guest wrote."""
    if entry.source != HOST:
        return entry
    name = console_units.get(field_text(entry.fields.get("_SYSTEMD_UNIT")) or "")
    return entry if name is None else dataclasses.replace(entry, source=name)


def merge_last(streams: Iterable[Iterable[Entry]], lines: int | None) -> Iterator[Entry]:
    """Entries of every stream (each in time order), in time order; with `lines`, only
    the last `lines` of them, holding no more than that many in memory."""
    merged = heapq.merge(*streams)
    if lines is None:
        return merged
    return iter(collections.deque(merged, maxlen=lines))


# ---------------------------------------------------------- the guest's files, safely


@dataclass(frozen=True)
class OpenFiles:
    fds: tuple[int, ...]
    signature: tuple[tuple[int, int, int, int], ...]  # (dev, ino, size, mtime) of each

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def is_journal_name(name: str) -> bool:
    return name.endswith((".journal", ".journal~"))


def open_journal_files(directory: Path, problems: Problems, label: str) -> OpenFiles:
    """Each regular `*.journal`/`*.journal~` file directly in `directory`, opened for
    reading. Symbolic links are refused (O_NOFOLLOW), FIFOs and devices too (fstat, after
    an O_NONBLOCK open that cannot wait for a writer); subdirectories are not entered;
    a file without a journal's signature is left out. The names are the guest's: they
    are never printed, and never handed to journalctl (it gets /proc/self/fd/N)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return OpenFiles((), ())  # never booted, or no persistent journal
    fds: list[int] = []
    signature: list[tuple[int, int, int, int]] = []
    skipped = 0
    try:
        with os.scandir(dir_fd) as entries:
            for dirent in entries:
                if not is_journal_name(dirent.name):
                    continue
                if len(fds) >= MAX_FILES:
                    skipped += 1
                    continue
                fd = _open_regular(dirent.name, dir_fd)
                if fd is None:
                    skipped += 1
                    continue
                st = os.fstat(fd)
                fds.append(fd)
                signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    except BaseException:
        OpenFiles(tuple(fds), ()).close()
        raise
    finally:
        os.close(dir_fd)
    if skipped:
        problems.warn(f"journal of {shown(label)}: {skipped} file(s) that are no journal left out")
    return OpenFiles(tuple(fds), tuple(sorted(signature)))


def _open_regular(name: str, dir_fd: int) -> int | None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:  # ELOOP: a symlink; gone meanwhile; not readable
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 8, 0) == _SIGNATURE:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def directory_signature(directory: Path) -> tuple[tuple[int, int, int, int], ...]:
    """What open_journal_files() would find, by lstat only: changes when journald writes
    (it ftruncate()s after each write, which moves mtime), rotates or removes a file."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return ()
    try:
        found: list[tuple[int, int, int, int]] = []
        with os.scandir(dir_fd) as entries:
            for dirent in entries:
                if len(found) >= MAX_FILES or not is_journal_name(dirent.name):
                    continue
                with contextlib.suppress(OSError):
                    st = dirent.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sorted(found))
    finally:
        os.close(dir_fd)


# -------------------------------------------------------------- journalctl processes


def journalctl_argv(
    source: Source,
    fds: Sequence[int],
    *,
    lines: int | None = None,
    after: str | None = None,
    follow: bool = False,
) -> list[str]:
    # --all: fields over 4096 bytes in full (not null); MAX_LINE bounds them instead.
    # --quiet: no "-- No entries --" on stdout.
    argv = ["journalctl", "--no-pager", "--quiet", "--all", "--output=json"]
    if source.directory is not None:
        if not fds:
            raise ValueError("no files: journalctl would read the host's journal")
        argv += [f"--file=/proc/self/fd/{fd}" for fd in fds]
    if follow:
        argv.append("--follow")
    if after is not None:
        argv.append(f"--after-cursor={after}")
    elif lines is not None:
        argv.append(f"--lines={lines}")
    argv += source.matches
    return argv


class Reader:
    """One journalctl, its stdout read as entries with a bounded wait, its stderr kept
    (the last lines) for a warning."""

    def __init__(self, source: Source, argv: list[str], fds: Sequence[int]) -> None:
        self.source = source
        self.cursor: str | None = None  # of the last entry read
        self.bad_lines = 0
        self.timed_out = 0.0  # the wait that ended it, if one did
        pipe = subprocess.PIPE
        self.proc = spawn(argv, stdout=pipe, stderr=pipe, pass_fds=tuple(fds))
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self._buffer = bytearray()
        self._skipping = False  # inside a line longer than MAX_LINE
        self._eof = False
        self.errors: collections.deque[str] = collections.deque(maxlen=5)
        self._stderr = threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True)
        self._stderr.start()

    def _drain(self, pipe: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in pipe:
                self.errors.append(raw[:300].decode(errors="replace").rstrip("\n"))

    def feed(self) -> list[Entry]:
        """Read what is there (the fd is readable) and return the complete entries."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            self._eof = True
            chunk = b"\n" if self._buffer else b""
        entries = []
        self._buffer += chunk
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            entry = parse_entry(line, self.source.label)
            if entry is None:
                self.bad_lines += 1
                continue
            self.cursor = cursor_of(entry) or self.cursor
            entries.append(entry)
        if len(self._buffer) > MAX_LINE:
            self._buffer.clear()
            if not self._skipping:
                self.bad_lines += 1
            self._skipping = True
        return entries

    @property
    def done(self) -> bool:
        return self._eof

    def entries(self, idle_timeout: float) -> Iterator[Entry]:
        """Every entry to the end of the output; a wait of more than idle_timeout for
        the next byte ends the process and the stream."""
        while not self._eof:
            ready, _, _ = select.select([self.fd], [], [], idle_timeout)
            if not ready:
                self.timed_out = idle_timeout
                self.proc.kill()
                return
            yield from self.feed()

    def finish(self, problems: Problems, timeout: float = 5.0) -> None:
        """End the process (if still running), and report what went wrong."""
        if self.proc.poll() is None and not self._eof:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stderr.join(timeout)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        what = f"journal of {shown(self.source.label)}"
        if self.timed_out:
            problems.warn(
                f"{what}: journalctl printed nothing for {self.timed_out:.0f} s, ended", failed=True
            )
        elif code not in (0, -9):
            detail = shown(self.errors[-1]) if self.errors else "no message"
            problems.warn(f"{what}: journalctl failed (exit code {code}): {detail}", failed=True)
        if self.bad_lines:
            problems.warn(f"{what}: {self.bad_lines} line(s) that are no journal entry skipped")


def start(
    source: Source,
    problems: Problems,
    *,
    lines: int | None = None,
    after: str | None = None,
    follow: bool = False,
) -> Reader | None:
    """A journalctl reading `source`, or None if a container has no journal file."""
    files = None
    fds: tuple[int, ...] = ()
    if source.directory is not None:
        files = open_journal_files(source.directory, problems, source.label)
        fds = _usable(files.fds, problems, source.label)
        if not fds:
            files.close()
            return None
    try:
        argv = journalctl_argv(source, fds, lines=lines, after=after, follow=follow)
        return Reader(source, argv, fds)
    finally:
        # journalctl holds its own copies now; ours are not needed any more.
        if files is not None:
            files.close()


# ------------------------------------------------------------------- history, follow


def _opens(fds: Sequence[int]) -> bool:
    """Whether journalctl opens these files: it refuses the whole set when one of them
    is bad (measured: a journal file cut after its header made it fail, "No data
    available"), so a guest's broken file would hide all of its journal."""
    argv = ["journalctl", "--quiet", "--lines=0", *(f"--file=/proc/self/fd/{fd}" for fd in fds)]
    try:
        return run(argv, check=False, timeout=IDLE_TIMEOUT, pass_fds=fds).returncode == 0
    except OperationError:  # it did not finish in time
        return False


def _usable(fds: tuple[int, ...], problems: Problems, label: str) -> tuple[int, ...]:
    """The files journalctl opens: all of them (one journalctl), or, when it refuses the
    set, those it opens one by one (one journalctl each: only when a file is bad)."""
    if not fds or _opens(fds):
        return fds
    good = tuple(fd for fd in fds if _opens([fd]))
    problems.warn(f"journal of {shown(label)}: {len(fds) - len(good)} broken file(s) left out")
    return good


Printer = Callable[[Entry], None]


def history(
    sources: Sequence[Source],
    lines: int | None,
    emit: Printer,
    problems: Problems,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
) -> dict[str, str]:
    """Print the entries of every source merged (with `lines`, the last `lines` of all);
    return the cursor of the last entry read from each source, for follow()."""
    readers: list[Reader] = []
    try:
        for source in sources:
            # At least one entry each, even with -n 0: its cursor is where follow() goes on.
            reader = start(source, problems, lines=None if lines is None else max(lines, 1))
            if reader is not None:
                readers.append(reader)
        streams = [r.entries(idle_timeout) for r in readers]
        for entry in merge_last(streams, lines):
            emit(entry)
    finally:
        for reader in readers:
            reader.finish(problems)
    return {r.source.label: r.cursor for r in readers if r.cursor is not None}


def follow(
    sources: Sequence[Source],
    cursors: dict[str, str],
    emit: Printer,
    problems: Problems,
    *,
    flush: Callable[[], None],
    poll_interval: float = POLL_INTERVAL,
    until: Callable[[], bool] = lambda: False,
) -> None:
    """Print new entries of every source as they come, until interrupted (or `until`).

    The host's journal is followed by `journalctl --follow`, which journald wakes up
    through inotify on its directory. A container's files cannot be followed so:
    journalctl watches the directory of each --file= it got, here /proc/self/fd, where
    no event ever comes (measured: `-f` showed nothing new). Following the container's
    directory by name instead would follow the guest's symlinks again. So each
    container's directory is looked at every `poll_interval` seconds (lstat only) and,
    when a file was written, added, rotated or removed, its files are opened anew and
    read after the last cursor: new entries show up within about that interval, and a
    rotation (a new system.journal) is picked up by the next look. A guest that keeps
    touching its files makes this run one short journalctl per interval, no more."""
    host = next((s for s in sources if s.directory is None), None)
    guests = [s for s in sources if s.directory is not None]
    streaming: Reader | None = None
    if host is not None:
        after = cursors.get(host.label)
        streaming = start(host, problems, after=after, lines=None if after else 0, follow=True)
    seen = {s.label: directory_signature(s.directory) for s in guests if s.directory}
    next_poll = time.monotonic() + poll_interval
    try:
        while not until():
            wait = max(next_poll - time.monotonic(), 0.0)
            watch = [streaming.fd] if streaming is not None and not streaming.done else []
            if watch:
                ready, _, _ = select.select(watch, [], [], wait)
            else:
                ready = []
                time.sleep(wait)  # nothing to wait on but the next look
            if ready and streaming is not None:
                for entry in streaming.feed():
                    emit(entry)
                flush()
            if time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + poll_interval
            for source in guests:
                assert source.directory is not None
                now = directory_signature(source.directory)
                if now == seen.get(source.label):
                    continue
                seen[source.label] = now
                after = cursors.get(source.label)
                reader = start(source, problems, after=after)
                if reader is None:
                    continue
                try:
                    for entry in reader.entries(IDLE_TIMEOUT):
                        emit(entry)
                finally:
                    reader.finish(problems)
                if reader.cursor is not None:
                    cursors[source.label] = reader.cursor
                flush()
    finally:
        if streaming is not None:
            streaming.finish(problems)
