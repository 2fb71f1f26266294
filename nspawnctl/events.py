"""What the host's unit of a container records of its boots and power-offs, for metrics.

The container's unit appends one line per event (render.py puts the commands in it):

    start UPTIME              its first command: a boot begins
    ready UPTIME              the guest's systemd said its boot is done (ExecStartPost=)
    stop UPTIME               the host asked for a stop (ExecStop=, before the quiesce)
    end UPTIME RESULT STATUS  the unit ended: systemd's result, nspawn's exit status

A shell line that takes a lock and appends costs a boot about 2 ms; a Python process
would cost 30. The host's systemd writes these as root into root's own state; nothing
here comes from a guest. A scrape folds the lines into counts, and folds a long file into
one `total` line under the same lock, so the file stays small however often containers
cycle."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nspawnctl.atomic import write_atomic
from nspawnctl.paths import Paths

# Upper bounds of the boot-time histogram, in seconds: a cold start is 0.2-0.5 s on a
# quiet host, seconds on a loaded one or with a small CPU share.
BOOT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FOLD_AT = 16 << 10  # bytes of lines before a scrape folds them (about 600 events)
_REBOOT_STATUS = "133"  # nspawn's exit status when the guest reboots (systemd-nspawn(1))


@dataclass(frozen=True)
class Counts:
    """A container's events, counted since its first boot on this host."""

    starts: int = 0  # boots begun: cold starts, by a connection or by hand
    boot_seconds_sum: float = 0.0
    # Boots that reached ready, per bucket of BOOT_BUCKETS (the last: longer than all).
    boot_buckets: tuple[int, ...] = field(default=(0,) * (len(BOOT_BUCKETS) + 1))
    guest_poweroffs: int = 0  # the guest powered itself off: its idle check, or its root
    reboots: int = 0  # the guest rebooted itself (nspawn exits 133; systemd restarts it)
    failures: int = 0  # the unit ended failed: a boot that did not come up, a crash
    # The boot in progress: when it began (uptime), and whether the host asked it to stop.
    began: float | None = None
    stop_asked: bool = False

    @property
    def boots(self) -> int:
        """Boots that came up (the histogram's count)."""
        return sum(self.boot_buckets)

    def after(self, line: str) -> Counts:
        """The counts with one more event line; a line this code did not write (cut short
        by a full disk) changes nothing."""
        kind, *values = line.split()
        if kind == "total":
            return _from_json(line.partition(" ")[2]) or self
        try:
            uptime = float(values[0]) if values else None
        except ValueError:
            return self
        if kind == "start":
            return replace(self, starts=self.starts + 1, began=uptime, stop_asked=False)
        if kind == "ready" and self.began is not None and uptime is not None:
            seconds = max(0.0, uptime - self.began)
            index = next((i for i, b in enumerate(BOOT_BUCKETS) if seconds <= b), -1)
            buckets = list(self.boot_buckets)
            buckets[index] += 1
            return replace(
                self,
                boot_buckets=tuple(buckets),
                boot_seconds_sum=self.boot_seconds_sum + seconds,
                began=None,
            )
        if kind == "stop":
            return replace(self, stop_asked=True)
        if kind == "end" and len(values) >= 2:
            # No status when nspawn was killed by a signal.
            result, status = values[1], (values[2] if len(values) > 2 else "")
            ended = replace(self, began=None, stop_asked=False)
            if result != "success":
                return replace(ended, failures=self.failures + 1)
            if self.stop_asked:
                return ended
            if status == _REBOOT_STATUS:
                return replace(ended, reboots=self.reboots + 1)
            return replace(ended, guest_poweroffs=self.guest_poweroffs + 1)
        return self


def _from_json(text: str) -> Counts | None:
    try:
        data = json.loads(text)
        data["boot_buckets"] = tuple(int(n) for n in data["boot_buckets"])
        if len(data["boot_buckets"]) != len(BOOT_BUCKETS) + 1:
            return None  # folded with other buckets: start again
        return Counts(**data)
    except (ValueError, TypeError, KeyError):
        return None


def events_dir(paths: Paths) -> Path:
    return paths.state_dir / "events"


def events_file(paths: Paths, name: str) -> Path:
    return events_dir(paths) / name


def _lock_file(paths: Paths, name: str) -> Path:
    # Its own file, never replaced: a fold replaces the events file.
    return events_dir(paths) / f".{name}.lock"


def record_command(paths: Paths, name: str, event: str) -> str:
    """The unit's command line that appends `event` (with the uptime after its first
    word) to the container's events. `event` may name the environment systemd gives
    ExecStopPost= ($SERVICE_RESULT)."""
    file = events_file(paths, name)
    kind, _sep, rest = event.partition(" ")
    script = (
        f"{{ [ -d {shlex.quote(str(file.parent))} ] || mkdir -p {shlex.quote(str(file.parent))}; }}"
        f" && exec 9>>{shlex.quote(str(_lock_file(paths, name)))} && flock 9"
        f' && read u _ </proc/uptime && echo "{kind} $u {rest}" >>{shlex.quote(str(file))}'
    )
    # One argument of a unit's command line: systemd reads C escapes in double quotes,
    # `$` as its own variables and `%` as specifiers.
    quoted = script.replace("\\", "\\\\").replace('"', '\\"')
    return f'/bin/sh -c "{quoted.replace("$", "$$").replace("%", "%%")}"'


def read_counts(paths: Paths, name: str, *, fold: bool = True) -> Counts | None:
    """The container's counts; None if they cannot be read (a user who is not root):
    zeros would look like a reset. With `fold` (and the right to write there), a long
    file is folded into one line first."""
    file = events_file(paths, name)
    try:
        with open(file, "rb") as f:
            data = f.read(_FOLD_AT * 64)  # bounded even if folding never can
    except FileNotFoundError:
        return Counts()  # never booted since it was added
    except OSError:
        return None
    counts = _counted(data)
    if fold and len(data) >= _FOLD_AT:
        try:
            return _fold(paths, name)
        except OSError:
            return counts  # read-only: counting the lines is still right
    return counts


def _counted(data: bytes) -> Counts:
    counts = Counts()
    for line in data.decode("ascii", "replace").splitlines():
        if line.strip():
            counts = counts.after(line)
    return counts


def _fold(paths: Paths, name: str) -> Counts:
    """Replace the lines with one `total` line, under the lock the unit's commands take:
    none is appended meanwhile, and none is lost."""
    fd = os.open(_lock_file(paths, name), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        file = events_file(paths, name)
        counts = _counted(file.read_bytes())
        write_atomic(file, f"total {json.dumps(asdict(counts))}\n", mode=0o600)
        return counts
    finally:
        os.close(fd)


def forget(paths: Paths, name: str) -> None:
    """A removed container's events go with it."""
    for path in (events_file(paths, name), _lock_file(paths, name)):
        path.unlink(missing_ok=True)
