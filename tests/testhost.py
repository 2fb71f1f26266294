"""A throw-away systemd host for integration tests (recipe: TESTING.md).

The machine that runs the tests has systemd installed but not as PID 1, and
booting systemd over its real root is destructive (tmpfiles wiped /tmp). So
the host is an nspawn container whose root is a volatile overlay of this
machine's root: the same binaries and Python, its own PID 1, D-Bus, journald
and machined, and every write lands in a tmpfs that teardown throws away.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

# Units of this machine's image that a host with journald, dbus, machined and
# logind does not need. postgresql is the one that matters: it waits forever
# and `is-system-running --wait` never returns. The rest are servers, timers
# and a console getty that slow the boot or do background work tests race.
DEFAULT_MASK: tuple[str, ...] = (
    "postgresql.service",
    "postgresql@.service",
    "ssh.service",
    "ssh.socket",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "fstrim.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "man-db.timer",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "console-getty.service",
    "getty@.service",
)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_RUNDIR = Path("/run/systemd/nspawn")


class CommandFailed(subprocess.CalledProcessError):
    """A CalledProcessError whose message carries the output, for test logs."""

    def __str__(self) -> str:
        return (
            f"{shlex.join(self.cmd)} exited with {self.returncode}\n"
            f"--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"
        )


@dataclass(frozen=True)
class Bind:
    """A directory of this machine bound into the test host."""

    source: Path
    target: str  # absolute path inside the test host
    readonly: bool = False


def _sh(argv: Sequence[str]) -> str:
    """Run a command on this machine (not in the host); return its stdout."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode:
        raise CommandFailed(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc.stdout


def _is_mount(path: Path, fstype: str | None = None) -> bool:
    with open("/proc/self/mounts") as mounts:
        fields = (line.split() for line in mounts)
        return any(f[1] == str(path) and fstype in (None, f[2]) for f in fields)


def _ensure_nspawn_rundir() -> None:
    # /run is not a tmpfs here and nspawn refuses to clean up its propagation
    # dirs on a real disk. The lock keeps parallel test runs from stacking a
    # second tmpfs that would hide the first host's dirs; the mount is harmless
    # and stays.
    NSPAWN_RUNDIR.mkdir(parents=True, exist_ok=True)
    with open("/run/nspawnctl-testhost.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_mount(NSPAWN_RUNDIR, "tmpfs"):
            _sh(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(NSPAWN_RUNDIR)])


class TestHost:
    """A booted systemd host to run commands in; use as a context manager."""

    __test__ = False  # not a pytest test class, despite the name
    root: Path  # the overlay root; read-only use by callers
    leader: int  # PID of the host's PID 1, as seen from this machine
    boot_seconds: float  # from starting nspawn to `is-system-running`

    def __init__(
        self,
        *,
        binds: Sequence[Bind] = (),
        mask: Sequence[str] = DEFAULT_MASK,
        boot_timeout: float = 60.0,
        workdir: Path | None = None,
    ) -> None:
        self.binds, self.mask, self.boot_timeout = tuple(binds), tuple(mask), boot_timeout
        self.machine = f"testhost-{secrets.token_hex(4)}"
        self._workdir, self._own_workdir = workdir, workdir is None
        self._mounts: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def __enter__(self) -> TestHost:
        atexit.register(self.close)  # a crashed test run must not leave mounts
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _boot(self) -> None:
        start = time.monotonic()
        work = self._workdir or Path(tempfile.mkdtemp(prefix="nspawnctl-testhost-", dir="/var/tmp"))
        self._workdir, upper, self.root = work, work / "upper", work / "root"
        upper.mkdir(exist_ok=True)
        self.root.mkdir(exist_ok=True)
        _sh(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(upper)])
        self._mounts.append(upper)
        (upper / "u").mkdir(mode=0o755)
        (upper / "w").mkdir()
        opts = f"lowerdir=/,upperdir={upper}/u,workdir={upper}/w"
        _sh(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)])
        self._mounts.append(self.root)
        # Not mounted yet, so writing through the overlay mount is reliable.
        # nspawn refuses to link journals when host and machine ids are equal.
        (self.root / "etc/machine-id").write_text(_sh(["systemd-id128", "new"]))
        (self.root / "etc/hostname").write_text("testhost\n")
        for unit in self.mask:
            link = self.root / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        _ensure_nspawn_rundir()
        # No system bus out here: --keep-unit and --register=no skip machined;
        # --private-network keeps the host's ports off this machine's network.
        argv = ["systemd-nspawn", "--keep-unit", "--register=no", "--private-network", "-b"]
        argv += ["-D", str(self.root), f"--machine={self.machine}"]
        for b in self.binds:
            argv.append(f"--bind{'-ro' if b.readonly else ''}={b.source}:{b.target}")
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._env(None), start_new_session=True,
            )  # fmt: skip
        deadline = start + self.boot_timeout
        self.wait_for(self._find_leader, timeout=self.boot_timeout, what=f"PID 1 of {self.machine}")
        try:
            self.wait_for(lambda: self._running(deadline), timeout=deadline - time.monotonic(),
                          what=f"{self.machine} to finish booting")  # fmt: skip
        except TimeoutError as e:
            jobs = self.run(["systemctl", "list-jobs", "--no-pager"], check=False, timeout=10)
            raise TimeoutError(f"{e}\n--- systemctl list-jobs:\n{jobs.stdout}{jobs.stderr}"
                               f"--- nspawn log (tail):\n{self._log_tail()}") from None  # fmt: skip
        self.boot_seconds = time.monotonic() - start

    @property
    def _log(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "nspawn.log"

    def _log_tail(self, size: int = 4000) -> str:
        data = self._log.read_bytes() if self._log.exists() else b""
        return data[-size:].decode(errors="replace")

    def _find_leader(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"systemd-nspawn exited with {self._proc.returncode}:\n{self._log_tail()}"
            )
        pid = self._proc.pid
        # Until it execs systemd the child may still be nspawn's own helper.
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    self.leader = int(child)
                    return True
        return False

    def _running(self, deadline: float) -> bool:
        # Before PID 1 has its bus up this says "offline" at once: poll again.
        try:
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                             timeout=max(deadline - time.monotonic(), 0.1)).stdout  # fmt: skip
        except subprocess.TimeoutExpired:
            return False
        return state.strip() in ("running", "degraded")

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        # The host's root is an overlay of ours, so this Python is there too.
        path = f"{Path(sys.executable).parent}:{BASE_PATH}"
        return {"PATH": path, "LANG": "C.UTF-8", "HOME": "/root", **(extra or {})}

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[str]:
        """Start argv inside the host; kw goes to Popen (stdin defaults to /dev/null)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        nsenter = ["nsenter", "-t", str(self.leader), "-a", "--", *argv]
        return subprocess.Popen(nsenter, env=self._env(env), text=True, **kw)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the host, capturing stdout and stderr."""
        stdin = subprocess.DEVNULL if input is None else subprocess.PIPE
        # Its own session, so that a timeout also kills the child nsenter
        # forks into the host's PID namespace, not only nsenter itself.
        with self.popen(argv, env=env, stdin=stdin, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, start_new_session=True) as proc:  # fmt: skip
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        if check and proc.returncode:
            raise CommandFailed(proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        # Through nsenter: files put into the overlay from outside while it is
        # mounted are not reliably seen, and would miss mounts made inside.
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.run(["sh", "-c", script, "sh", path, f"{mode:o}"], input=text)

    def wait_for(
        self, predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
    ) -> None:
        """Poll predicate until it is true; the only place that sleeps."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
            time.sleep(interval)

    def close(self) -> None:
        """Power off, unmount and remove everything; safe to call again."""
        atexit.unregister(self.close)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # nspawn powers the host off cleanly on SIGTERM
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # While nspawn lives it has not reaped PID 1, so the PID is
                # still ours; killing it ends the whole PID namespace.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        while self._mounts:
            mount = self._mounts.pop()
            with contextlib.suppress(CommandFailed):
                _sh(["umount", str(mount)])
            if _is_mount(mount):
                _sh(["umount", "--lazy", str(mount)])
        # rmdir, never rmtree: should a mount survive, rmtree would descend
        # into an overlay of this machine's root.
        if self._workdir is not None:
            # nspawn's image lock sits next to the root and is sometimes left.
            for name in ("nspawn.log", ".#root.lck"):
                (self._workdir / name).unlink(missing_ok=True)
            paths = [self._workdir / "root", self._workdir / "upper"]
            for path in paths + ([self._workdir] if self._own_workdir else []):
                with contextlib.suppress(FileNotFoundError):
                    path.rmdir()
            if self._own_workdir:
                self._workdir = None


def _parse_bind(spec: str) -> Bind:
    source, sep, rest = spec.partition(":")
    target, _, flag = rest.partition(":")
    if not sep or not target.startswith("/") or flag not in ("", "ro"):
        raise argparse.ArgumentTypeError(f"expected SRC:DST[:ro] with an absolute DST, got {spec!r}")
    return Bind(Path(source).resolve(), target, readonly=flag == "ro")


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testhost", description="Boot a throw-away systemd host, run a command."
    )
    parser.add_argument("--bind", action="append", default=[], type=_parse_bind,
                        metavar="SRC:DST[:ro]", help="bind a directory of this machine")  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER, help="shell | -- CMD ARGS...")
    ns = parser.parse_args(args)
    argv: list[str] = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not argv:
        parser.error("give a command after --, or 'shell'")
    if argv == ["shell"]:
        argv = ["bash", "-l"]
    # SIGTERM would skip atexit: turn it into SystemExit so teardown runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with TestHost(binds=ns.bind) as host:
        if argv == ["bash", "-l"]:
            print(f"testhost: {host.machine} up in {host.boot_seconds:.1f} s", file=sys.stderr)
        with host.popen(argv, stdin=None, env={"TERM": os.environ.get("TERM", "dumb")}) as proc:
            # Ctrl-C is for the command (it shares our terminal); we then
            # still tear down.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            rc = proc.wait()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
