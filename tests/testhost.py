"""A throw-away systemd host: an nspawn container booted on a volatile overlay of this
machine's root (booting systemd over the real root wiped /tmp). See TESTING.md."""

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
from subprocess import DEVNULL, PIPE
from typing import Any

# What a host with journald, dbus, machined and logind does not need from this image.
DEFAULT_MASK: tuple[str, ...] = (
    # Hangs the boot on this machine's network (TESTING.md); costs ~2.5 s on a private one.
    *("postgresql.service", "postgresql@.service"),
    # Servers, and gettys nobody logs in on.
    *("ssh.service", "ssh.socket", "console-getty.service", "getty@.service"),
    # Background jobs tests would race with; services with nothing to do in a container.
    *("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "man-db.timer"),
    *("e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer"),
    *("systemd-timesyncd.service", "systemd-pstore.service"),
)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_RUNDIR = Path("/run/systemd/nspawn")
# Where a test host's own cgroup is made, in each of these that is a cgroup hierarchy.
CGROUP_ROOTS = tuple(Path("/sys/fs/cgroup", h) for h in ("systemd", "unified", ""))
# The checkout this code runs from: the package and its templates, the tests, the
# scripts. An editable install points into it.
CHECKOUT = Path(__file__).resolve().parent.parent


class CommandFailed(subprocess.CalledProcessError):
    """A CalledProcessError whose message carries the output, for test logs."""

    def __str__(self) -> str:
        return (
            f"{shlex.join(self.cmd)} exited with {self.returncode}\n"
            f"--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"
        )


@dataclass(frozen=True)
class Bind:  # a directory of this machine bound into the test host
    source: Path
    target: str  # absolute path inside the test host
    readonly: bool = False


def sh(*argv: str | Path) -> str:
    """Run a command on this machine (not in a test host or VM); return its stdout."""
    args = [str(a) for a in argv]
    proc = subprocess.run(args, check=False, stdin=DEVNULL, capture_output=True, text=True)
    if proc.returncode:
        raise CommandFailed(proc.returncode, args, proc.stdout, proc.stderr)
    return proc.stdout


def wait_for(
    predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll predicate until it is true; the only place that sleeps."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def _is_mount(path: Path, fstype: str | None = None) -> bool:
    with open("/proc/self/mounts") as mounts:
        fields = (line.split() for line in mounts)
        return any(f[1] == str(path) and fstype in (None, f[2]) for f in fields)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):  # it may be gone already
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def _kill_inside(proc: subprocess.Popen[str]) -> None:
    # Kill the child nsenter forked into the host, not nsenter, which then reaps it and
    # exits. Killed first, nsenter would hand its child to this machine's init, and the
    # host's PID 1 could not finish exiting until that zombie is reaped (~10 s here).
    # Loop: right after Popen, nsenter may not have forked yet.
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline:
        for child in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
    proc.kill()  # stuck: the last resort; a no-op once it has exited
    proc.wait()


class TestHost:
    """A booted systemd host to run commands in; use as a context manager."""

    __test__ = False  # not a pytest test class, despite the name
    root: Path  # the overlay root; read-only use by callers
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
        self.leader = 0  # PID of the host's PID 1, as seen from this machine
        self._workdir = workdir
        self._work: Path | None = None  # in use, from the start of the boot to teardown
        self._mounts: list[Path] = []
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._clients: list[subprocess.Popen[str]] = []
        self._cgroups: list[Path] = []  # made for it on a host without systemd

    def __enter__(self) -> TestHost:
        atexit.register(self.close)  # a crashed test run must not leave mounts behind
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _boot(self) -> None:
        start = time.monotonic()
        work = self._workdir or Path(tempfile.mkdtemp(prefix="nspawnctl-testhost-", dir="/var/tmp"))
        self._work, self._log, upper, self.root = work, work / "log", work / "upper", work / "root"
        upper.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(upper))
        self._mounts.append(upper)
        (upper / "u").mkdir(mode=0o755)
        (upper / "w").mkdir()
        opts = f"lowerdir=/,upperdir={upper}/u,workdir={upper}/w"
        sh("mount", "-t", "overlay", "overlay", "-o", opts, str(self.root))
        self._mounts.append(self.root)
        # Nothing runs in the host yet, so writing through the mount is safe. nspawn
        # refuses to link journals when host and machine ids are equal.
        (self.root / "etc/machine-id").write_text(sh("systemd-id128", "new"))
        (self.root / "etc/hostname").write_text("testhost\n")
        for unit in self.mask:
            (self.root / "etc/systemd/system" / unit).unlink(missing_ok=True)
            (self.root / "etc/systemd/system" / unit).symlink_to("/dev/null")
        # The host would empty /tmp at boot (tmpfiles' `D /tmp`), and with it a checkout
        # there (the one bound below included): keep /tmp as it is, created, not cleaned.
        tmpfiles = self.root / "etc/tmpfiles.d"
        tmpfiles.mkdir(parents=True, exist_ok=True)
        (tmpfiles / "tmp.conf").write_text("d /tmp 1777 root root -\n")
        # /run is not a tmpfs here and nspawn will not clean its propagation dirs on a real
        # disk. The lock keeps parallel runs from stacking a second tmpfs over a running
        # host's dirs. The mount is harmless and stays.
        NSPAWN_RUNDIR.mkdir(parents=True, exist_ok=True)
        with open("/run/nspawnctl-testhost.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Only where /run is on disk (this machine): on a systemd host /run is a
            # tmpfs already, and a mount here would hide running containers' dirs.
            on = sh("stat", "--file-system", "--format=%T", str(NSPAWN_RUNDIR)).strip()
            if on != "tmpfs":
                sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(NSPAWN_RUNDIR))
        # No system bus out here: --keep-unit and --register=no skip machined.
        # --private-network keeps the host's ports off this machine's network.
        argv = ["systemd-nspawn", "--keep-unit", "--register=no", "--private-network", "-b"]
        argv += ["-D", str(self.root), f"--machine={self.machine}"]
        # The checkout is bound explicitly, read-only, where it is: the overlay of / does
        # not show a separate mount (/home on a partition of its own) nor reliably what
        # changes under it, and nspawnctl runs inside from the checkout (editable install).
        binds = (*self.binds, Bind(CHECKOUT, str(CHECKOUT), readonly=True))
        argv += [f"--bind{'-ro' if b.readonly else ''}={b.source}:{b.target}" for b in binds]
        argv = self._in_own_cgroup(argv)
        env = {"PATH": BASE_PATH, "TERM": "dumb"}  # TERM=dumb: a plain-text console log
        with open(self._log, "wb") as log:
            self._nspawn = subprocess.Popen(
                argv, stdin=DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
            )
        deadline = start + self.boot_timeout
        self.wait_for(self._find_leader, timeout=self.boot_timeout, what="the host's PID 1")
        try:
            what = f"{self.machine} to boot"
            timeout = deadline - time.monotonic()
            self.wait_for(lambda: self._booted(deadline), timeout=timeout, what=what)
        except TimeoutError as e:
            jobs = self.run(["systemctl", "list-jobs", "--no-pager"], check=False, timeout=10)
            raise TimeoutError(
                f"{e}\n--- systemctl list-jobs:\n{jobs.stdout}{jobs.stderr}"
                f"--- nspawn log:\n{self._log_tail()}"
            ) from None
        self.boot_seconds = time.monotonic() - start

    def _in_own_cgroup(self, argv: list[str]) -> list[str]:
        """`argv` run in a cgroup of its own. nspawn --keep-unit boots the host in the
        cgroup it is started in, and the host's systemd takes that tree for its own: two
        test hosts in one cgroup (parallel test modules) remove each other's unit cgroups,
        and their mounts fail to unmount (status=219/CGROUP)."""
        if Path("/run/systemd/system").is_dir():  # a systemd host: a scope it delegates
            scope = ["systemd-run", "--scope", "--quiet", "--collect", "--property=Delegate=yes"]
            return [*scope, f"--unit={self.machine}", *argv]
        # No systemd here: a cgroup in each hierarchy that has processes (on a hybrid
        # host the named systemd one and the unified one), joined before exec.
        for root in CGROUP_ROOTS:
            if (root / "cgroup.procs").exists():
                (root / self.machine).mkdir()
                self._cgroups.append(root / self.machine)
        join = "".join(
            f"echo $$ > {shlex.quote(str(c / 'cgroup.procs'))} && " for c in self._cgroups
        )
        return ["sh", "-c", f'{join}exec "$@"', "sh", *argv]

    def _remove_cgroups(self) -> None:
        # Bottom-up: the host's systemd left its slices there; a cgroup goes by rmdir.
        while self._cgroups:
            top = self._cgroups.pop()
            for where, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(where)

    def _log_tail(self) -> str:
        # The console is a pty: its lines end in "\r\r\n".
        return self._log.read_bytes()[-3000:].decode(errors="replace").replace("\r", "")

    def _find_leader(self) -> bool:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            rc = self._nspawn.returncode
            raise RuntimeError(f"systemd-nspawn exited with {rc}:\n{self._log_tail()}")
        # Until it has exec'd systemd, the child may still be nspawn's helper.
        for child in _children(self._nspawn.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text() == "systemd\n":
                    self.leader = child
                    return True
        return False

    def _booted(self, deadline: float) -> bool:
        # Until PID 1 has its bus up this says "offline" at once: then poll again.
        timeout = max(deadline - time.monotonic(), 0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            argv = ["systemctl", "is-system-running", "--wait"]
            state = self.run(argv, check=False, timeout=timeout).stdout.strip()
            return state in ("running", "degraded")
        return False

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[str]:
        """Start argv in the host; kw goes to Popen (stdin defaults to /dev/null)."""
        # The host's root is an overlay of ours, so this Python is there too.
        path = f"{Path(sys.executable).parent}:{BASE_PATH}"
        clean = {"PATH": path, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})}
        kw.setdefault("stdin", DEVNULL)
        nsenter = ["nsenter", "-t", str(self.leader), "-a", "--", *argv]
        proc = subprocess.Popen(nsenter, env=clean, text=True, **kw)
        self._clients = [p for p in self._clients if p.poll() is None] + [proc]
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the host, capture stdout and stderr; check raises CommandFailed."""
        stdin = DEVNULL if input is None else PIPE
        with self.popen(argv, env=env, stdin=stdin, stdout=PIPE, stderr=PIPE) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except BaseException:  # a timeout, Ctrl-C: leave nothing running inside
                _kill_inside(proc)
                raise
        if check and proc.returncode:
            raise CommandFailed(proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        # Through nsenter: files put into the overlay from outside while it is mounted are
        # not reliably seen, and would miss mounts made inside (/tmp, binds).
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.run(["sh", "-c", script, "sh", path, f"{mode:o}"], input=text)

    def wait_for(
        self, predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
    ) -> None:
        wait_for(predicate, timeout=timeout, what=what, interval=interval)

    def close(self) -> None:
        """Power off, unmount and remove everything; safe to call again."""
        atexit.unregister(self.close)
        # A live client stalls the poweroff: shutdown SIGSTOPs its child, nsenter stops
        # itself in turn and, outside the host, never gets the SIGCONT. End them first.
        for client in self._clients:
            if client.poll() is None:
                _kill_inside(client)
        nspawn, self._nspawn = self._nspawn, None
        if nspawn is not None and nspawn.poll() is None:
            nspawn.terminate()  # nspawn powers the host off cleanly on SIGTERM
            try:
                nspawn.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # nspawn has not reaped PID 1, so that PID is still the leader.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
                os.killpg(nspawn.pid, signal.SIGKILL)
                nspawn.wait()
        self._remove_cgroups()
        while self._mounts:
            mount = self._mounts.pop()
            with contextlib.suppress(CommandFailed):
                sh("umount", str(mount))
            if _is_mount(mount):
                sh("umount", "--lazy", str(mount))
        # rmdir, never rmtree: were a mount left, rmtree would descend into an overlay of
        # this machine's root. nspawn sometimes leaves its lock file next to the root.
        if self._work is not None:
            for name in ("log", ".#root.lck"):
                (self._work / name).unlink(missing_ok=True)
            for name in ("root", "upper", ""):  # "": WORK itself, if nothing else is in it
                with contextlib.suppress(OSError):
                    (self._work / name).rmdir()
            self._work = None


def _parse_bind(spec: str) -> Bind:
    source, _, rest = spec.partition(":")
    target, _, flag = rest.partition(":")
    if not target.startswith("/") or flag not in ("", "ro"):
        raise argparse.ArgumentTypeError(f"want SRC:DST[:ro], DST absolute; got {spec!r}")
    return Bind(Path(source).resolve(), target, readonly=flag == "ro")


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testhost", description=__doc__)
    parser.add_argument("--bind", action="append", default=[], type=_parse_bind)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="shell | -- CMD ARGS...")
    ns = parser.parse_args(args)
    argv: list[str] = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not argv:
        parser.error("give a command after --, or 'shell'")
    # SIGTERM would skip atexit: make it a SystemExit, so that teardown runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with TestHost(binds=ns.bind) as host:
        if argv == ["shell"]:
            print(f"testhost: {host.machine} up in {host.boot_seconds:.1f} s", file=sys.stderr)
            argv = ["bash", "-l"]
        env = {"TERM": os.environ.get("TERM", "dumb")}
        # Not `with`: on SIGTERM, Popen.__exit__ would wait for the command to end.
        proc = host.popen(argv, stdin=None, env=env)
        # Ctrl-C is for the command, which shares our terminal; then we still tear down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        rc = proc.wait()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
