"""A whole VM host for the tests that need a machine of their own: qemu under software
emulation (TCG; KVM does not work on the development VM, see TESTING.md), booting
Debian's cloud kernel on a disk made from a bootstrapped tree, with the unified cgroup
hierarchy, so resource limits are enforced and a host reboot is a real reboot.

    base tree   debootstrap + kernel modules + pystemd, built once and cached under
                /var/cache/nspawnctl-test/vm/KEY (KEY: what built it)
    layer       per disk: this checkout of nspawnctl, the cached container image,
                a machine-id, the test agent, a client SSH key
    disk        mkfs.ext4 -d over a read-only overlay of layer + base (a few seconds)
    VM          qemu with that disk; commands go to an agent in the VM over a
                virtio-serial port (tests/vm/agent.py), so one boot serves many commands

Nothing here sleeps to synchronise: waits are on a condition, with a timeout."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.machinery
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import DEVNULL

from tests import testhost
from tests.testhost import CommandFailed, sh

CACHE = Path(os.environ.get("NSPAWNCTL_TEST_VM_CACHE", "/var/cache/nspawnctl-test/vm"))
PROJECT = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
RELEASE = "bookworm"
# A systemd host as an admin would have it, plus what nspawnctl and the tests run:
# python3 and nspawnctl's dependencies (pystemd itself is copied in, see
# _install_pystemd; lxml and psutil are its own), ssh (the client end of the
# scenarios), ss, udev and kmod (devices and modules).
PACKAGES = (
    *("systemd", "systemd-sysv", "dbus", "udev", "kmod", "systemd-container"),
    *("python3", "python3-yaml", "python3-jinja2", "python3-lxml", "python3-psutil"),
    *("openssh-client", "iproute2", "util-linux", "procps"),
)
# Nobody logs in on the VM's consoles; background jobs the scenarios would race with.
MASK = (
    *("getty@tty1.service", "serial-getty@ttyS0.service"),
    *("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer"),
    *("e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer"),
)
# The root disk is an NVMe drive because the cloud kernel has that driver built in
# (virtio_blk is a module): no initrd to unpack and run, some 15 s less per boot here.
KERNEL_ARGS = (
    *("root=/dev/nvme0n1", "rootfstype=ext4", "rw", "console=ttyS0", "quiet"),
    "systemd.unified_cgroup_hierarchy=1",
)
# Bump when the steps that make the base tree change, so a stale cache is not reused.
LAYOUT = 2
AGENT_PORT = "nspawnctl.agent"
AGENT_UNIT = "nspawnctl-test-agent.service"
CLIENT_KEY = "/root/.ssh/id_ed25519"
PROJECT_IN_VM = "/opt/nspawnctl"
IMAGES_IN_VM = "var/lib/nspawnctl/images"
SITE_IN_VM = "usr/local/lib/python3.11/dist-packages"

# (what, wall seconds, qemu's CPU seconds or None), for the summary at the end of the
# run (tests/vm/conftest.py). The CPU figure is the work done, whatever else this
# machine runs meanwhile; under emulation the wall time tracks how much CPU qemu gets.
TIMINGS: list[tuple[str, float, float | None]] = []


class VMUnavailableError(Exception):
    """This machine cannot run the VM tier (the tests skip, naming the reason)."""


def record(what: str, seconds: float, cpu: float | None = None) -> None:
    TIMINGS.append((what, seconds, cpu))
    print(
        f"vm timing: {what}: {seconds:.1f} s" + ("" if cpu is None else f" (qemu CPU {cpu:.1f} s)")
    )


@contextlib.contextmanager
def timed(what: str, vm: VM | None = None) -> Iterator[None]:
    start, cpu = time.monotonic(), vm.cpu_seconds() if vm else 0.0
    yield
    record(what, time.monotonic() - start, vm.cpu_seconds() - cpu if vm else None)


def wait_for(
    predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    """testhost.wait_for, polling less often: the VM's commands cost more."""
    testhost.wait_for(predicate, timeout=timeout, what=what, interval=interval)


@dataclass(frozen=True)
class Kernel:
    """Debian's cloud kernel: small, with the drivers of a VM."""

    release: str  # 6.1.0-56-cloud-amd64
    package_version: str
    vmlinuz: Path
    modules: Path

    @classmethod
    def find(cls) -> Kernel:
        found = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"), key=_version_key)
        if not found:
            raise VMUnavailableError(
                "no Debian cloud kernel in /boot (apt-get install linux-image-cloud-amd64)"
            )
        release = found[-1].name.removeprefix("vmlinuz-")
        kernel = cls(
            release,
            sh("dpkg-query", "-W", "-f=${Version}", f"linux-image-{release}"),
            found[-1],
            Path(f"/lib/modules/{release}"),
        )
        if not kernel.modules.is_dir():
            raise VMUnavailableError(
                f"{kernel.modules} is missing (reinstall linux-image-{release})"
            )
        return kernel


def _version_key(path: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", path.name)]


def check_prerequisites() -> Kernel:
    """Raise VMUnavailableError unless this machine can build and boot a VM host."""
    if os.geteuid() != 0:
        raise VMUnavailableError("the VM tier needs root (debootstrap, mounts)")
    for program in (QEMU, "debootstrap", "mkfs.ext4", "ssh-keygen"):
        if shutil.which(program) is None:
            raise VMUnavailableError(f"{program} is not installed (see scripts/setup.sh)")
    # The VM runs the pystemd of this Python: its extension must suit the VM's 3.11.
    if ".cpython-311-" not in importlib.machinery.EXTENSION_SUFFIXES[0]:
        raise VMUnavailableError(
            "pystemd is copied into the VM's Python 3.11: run the tests with a 3.11"
        )
    return Kernel.find()


# ---------------------------------------------------------------------------------------
# The base tree (cached)


@dataclass(frozen=True)
class BaseRecipe:
    """Everything the base tree is made from: a change makes a new cache entry."""

    release: str
    packages: tuple[str, ...]
    mask: tuple[str, ...]
    kernel: str
    kernel_package: str
    pystemd: str
    layout: int

    @classmethod
    def current(cls, kernel: Kernel) -> BaseRecipe:
        pystemd = importlib.metadata.version("pystemd")
        return cls(RELEASE, PACKAGES, MASK, kernel.release, kernel.package_version, pystemd, LAYOUT)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def key(self) -> str:
        return f"{self.release}-{hashlib.sha256(self.to_json().encode()).hexdigest()[:12]}"


def ensure_base(kernel: Kernel, cache: Path = CACHE) -> Path:
    """The root tree of the VM host, bootstrapped on first use; returns its path."""
    recipe = BaseRecipe.current(kernel)
    root = cache / recipe.key / "root"
    if root.is_dir():
        return root
    with _locked(cache, fcntl.LOCK_EX):  # a parallel run may be building it right now
        if root.is_dir():
            return root
        staging = Path(tempfile.mkdtemp(prefix=f".build-{recipe.key}-", dir=cache))
        try:
            with timed(f"base tree bootstrapped ({recipe.key})"):
                _build_base(staging / "root", recipe, kernel)
            (staging / "recipe.json").write_text(recipe.to_json())
            staging.chmod(0o755)
            staging.rename(cache / recipe.key)  # only a complete tree gets the real name
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        # Trees of older recipes are dead weight (~450 MB each); no disk is being made
        # from one while this lock is held.
        for old in cache.iterdir():
            if old.is_dir() and not old.name.startswith(".") and old.name != recipe.key:
                shutil.rmtree(old)
    return root


@contextlib.contextmanager
def _locked(cache: Path, operation: int) -> Iterator[None]:
    """LOCK_EX to build or remove base trees, LOCK_SH to read one."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, operation)
        yield


def _build_base(root: Path, recipe: BaseRecipe, kernel: Kernel) -> None:
    sh(
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(recipe.packages)}",
        recipe.release,
        root,
    )
    # The modules of the kernel qemu boots: virtio_console (the agent's port), overlay
    # (containers' roots) and the rest are loaded from the root file system.
    (root / "usr/lib/modules").mkdir(parents=True, exist_ok=True)
    sh("cp", "-a", kernel.modules, root / "usr/lib/modules" / kernel.release)
    _install_pystemd(root)
    # Debian's systemd makes this on a normal install: a persistent journal, where
    # nspawnctl links its containers' journals.
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    for unit in recipe.mask:
        (root / "etc/systemd/system" / unit).unlink(missing_ok=True)
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    # Each disk gets its own machine-id (stage_layer): no two VM hosts share one.
    (root / "etc/machine-id").unlink(missing_ok=True)


def _install_pystemd(root: Path) -> None:
    """pystemd of this machine (the version the other tiers test), into the VM's
    site-packages. Debian's python3-pystemd is 0.11, older than nspawnctl requires."""
    dist = importlib.metadata.distribution("pystemd")
    site = root / SITE_IN_VM
    site.mkdir(parents=True, exist_ok=True)
    top = {Path(str(f)).parts[0] for f in dist.files or ()}
    for name in sorted(top):
        source = Path(str(dist.locate_file(name)))
        if source.is_dir() and name != "__pycache__":
            # With its byte code: the same for every 3.11, and compiling under emulation
            # costs seconds in every fresh VM.
            shutil.copytree(source, site / name)


# ---------------------------------------------------------------------------------------
# The per-disk layer and the disk


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def stage_layer(layer: Path, *, images: Sequence[Path], hostname: str = "vmhost") -> None:
    """What one disk adds to the base tree: a fresh host identity, this checkout of
    nspawnctl installed, the cached container images in its store, the agent."""
    _write(layer / "etc/hostname", f"{hostname}\n")
    _write(layer / "etc/machine-id", sh("systemd-id128", "new"), 0o444)
    # nspawnctl from this checkout, as a path on sys.path plus its entry point.
    target = layer / PROJECT_IN_VM.lstrip("/")
    for part in ("nspawnctl", "units", "guest-skel"):
        shutil.copytree(
            PROJECT / part, target / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    sh(sys.executable, "-m", "compileall", "-q", target / "nspawnctl")  # as for pystemd
    _write(layer / SITE_IN_VM / "nspawnctl-checkout.pth", f"{PROJECT_IN_VM}\n")
    _write(
        layer / "usr/local/bin/nspawnctl",
        "#!/usr/bin/python3\nimport sys\n\nfrom nspawnctl.cli import main\n\nsys.exit(main())\n",
        0o755,
    )
    # The same store layout nspawnctl uses (paths.py): KEY/{recipe.json,current,v1}.
    # Hard links where they can be (nothing writes to the layer, and mkfs only reads it).
    store = layer / IMAGES_IN_VM
    store.mkdir(parents=True, exist_ok=True)
    for image in images:
        same_fs = image.stat().st_dev == store.stat().st_dev
        sh("cp", "-a", "--link" if same_fs else "--reflink=auto", image, store / image.name)
    # The test agent, started at boot on its virtio-serial port.
    _write(
        layer / "usr/local/libexec/nspawnctl-test-agent",
        (Path(__file__).parent / "agent.py").read_text(),
        0o755,
    )
    _write(
        layer / "etc/systemd/system" / AGENT_UNIT,
        "[Unit]\n"
        "Description=nspawnctl test agent (commands from the test run over virtio-serial)\n"
        "# The port appears when udev has loaded virtio_console: until then, retry.\n"
        "StartLimitIntervalSec=0\n"
        "\n[Service]\n"
        "ExecStart=/usr/bin/python3 /usr/local/libexec/nspawnctl-test-agent"
        f" /dev/virtio-ports/{AGENT_PORT}\n"
        "Restart=always\n"
        "RestartSec=200ms\n"
        "\n[Install]\nWantedBy=multi-user.target\n",
    )
    wants = layer / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / AGENT_UNIT).symlink_to(f"/etc/systemd/system/{AGENT_UNIT}")
    # The client key the scenarios log in to containers with.
    ssh = layer / "root/.ssh"
    ssh.mkdir(parents=True, mode=0o700)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vm-test", "-f", ssh / "id_ed25519")


def make_disk(base: Path, layer: Path, disk: Path, size: str = "4G") -> None:
    """An ext4 image of base with layer on top. mkfs.ext4 -d takes one directory: a
    read-only overlay joins the two without writing to the cached base."""
    merged = Path(tempfile.mkdtemp(prefix="merged-", dir=disk.parent))
    with _locked(base.parents[1], fcntl.LOCK_SH):
        if not base.is_dir():
            raise RuntimeError(f"{base} was removed by a run with another recipe: run again")
        sh("mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={layer}:{base}", merged)
        try:
            sh("mkfs.ext4", "-q", "-F", "-L", "vmroot", "-d", merged, disk, size)
        finally:
            sh("umount", merged)
            merged.rmdir()


# ---------------------------------------------------------------------------------------
# The VM


@dataclass(frozen=True)
class _Reply:  # the agent's answer to one request
    rc: int | None  # None: killed at its timeout
    stdout: str
    stderr: str


class VM:
    """qemu booting `disk`; use as a context manager. `run` executes a command in the
    VM through the agent. `reboot` powers off and boots the same disk again."""

    def __init__(
        self,
        disk: Path,
        kernel: Kernel,
        workdir: Path,
        *,
        memory_mb: int = 2048,
        cpus: int = 2,
        boot_timeout: float = 180.0,
    ) -> None:
        self.disk, self.kernel, self.workdir = disk, kernel, workdir
        self.memory_mb, self.cpus, self.boot_timeout = memory_mb, cpus, boot_timeout
        self.boots = 0
        self.boot_seconds = 0.0
        self._qemu: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._pending = b""
        self._next_id = 0

    def __enter__(self) -> VM:
        atexit.register(self.close)  # a crashed run must not leave qemu behind
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def cpu_seconds(self) -> float:
        """CPU time qemu has used so far in this boot (0 when it is not running)."""
        if self._qemu is None:
            return 0.0
        with contextlib.suppress(OSError):
            # utime and stime, fields 14 and 15, after the command name in parentheses.
            fields = Path(f"/proc/{self._qemu.pid}/stat").read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def console_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.console_log.read_bytes()[-chars:].decode(errors="replace")
        return ""

    def boot(self) -> None:
        assert self._qemu is None, "already running"
        start = time.monotonic()
        self.boots += 1
        path = self.workdir / "agent.sock"
        path.unlink(missing_ok=True)
        # This end listens and qemu connects at start-up: the channel is up before the
        # guest boots, so the first request waits in it until the agent opens its port.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen(1)
            cmdline = " ".join(KERNEL_ARGS)
            argv = [
                # The kernel kills qemu when this test run dies, even by SIGKILL, which
                # skips every teardown.
                *("setpriv", "--pdeathsig", "KILL", "--"),
                QEMU,
                *("-accel", "tcg", "-m", str(self.memory_mb), "-smp", str(self.cpus)),
                *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
                *("-kernel", str(self.kernel.vmlinuz)),
                *("-append", cmdline),
                # cache=unsafe: no flushes to this machine's disk; a clean power-off
                # still writes everything (qemu exits only after the guest has synced).
                *("-drive", f"file={self.disk},format=raw,if=none,id=root,cache=unsafe"),
                *("-device", "nvme,drive=root,serial=vmroot"),
                *("-nic", "none", "-device", "virtio-rng-pci"),
                *("-serial", f"file:{self.console_log}"),
                *("-device", "virtio-serial-pci"),
                *("-chardev", f"socket,id=agent,path={path}"),
                *("-device", f"virtserialport,chardev=agent,name={AGENT_PORT}"),
            ]
            with open(self.workdir / "qemu.log", "ab") as log:
                self._qemu = subprocess.Popen(
                    argv,
                    stdin=DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            self._channel = self._accept(listener)
        self._pending = b""
        deadline = start + self.boot_timeout
        state = self.run(
            ["systemctl", "is-system-running", "--wait"],
            check=False,
            timeout=self.boot_timeout,
            deadline=deadline,
        ).stdout.strip()
        if state not in ("running", "degraded"):
            raise RuntimeError(f"the VM booted into state {state!r}:\n{self.console_tail()}")
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
            print(f"vm: booted degraded; failed units:\n{failed}")
        self.boot_seconds = time.monotonic() - start
        record(f"VM boot #{self.boots} to multi-user", self.boot_seconds, self.cpu_seconds())

    def _accept(self, listener: socket.socket) -> socket.socket:
        """qemu's connection to the agent's channel, or an error with qemu's own words."""
        qemu = self._qemu
        assert qemu is not None
        listener.settimeout(0.2)
        accepted: list[socket.socket] = []

        def connected() -> bool:
            if qemu.poll() is not None:
                raise RuntimeError(f"qemu exited with {qemu.returncode}:\n{self._qemu_log()}")
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])
            return bool(accepted)

        wait_for(connected, timeout=30, what="qemu to connect to the agent's channel", interval=0)
        return accepted[0]

    def _qemu_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "qemu.log").read_text(errors="replace")[-2000:]
        return ""

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the VM, capture stdout and stderr; check raises CommandFailed."""
        if self._channel is None:
            raise RuntimeError("the VM is not running")
        self._next_id += 1
        ident = self._next_id
        request = {"id": ident, "argv": list(argv), "input": input, "timeout": timeout}
        request["env"] = dict(env or {})
        start, cpu = time.monotonic(), self.cpu_seconds()
        self._channel.sendall(json.dumps(request).encode() + b"\n")
        # The agent kills the command at `timeout`; the margin covers a slow guest. Until
        # the boot has got as far as the agent, `deadline` bounds the wait instead.
        reply = self._reply(ident, deadline or time.monotonic() + timeout + 60, argv)
        took, used = time.monotonic() - start, self.cpu_seconds() - cpu
        print(f"vm: {took:5.1f} s (CPU {used:4.1f} s) rc={reply.rc} $ {shlex.join(argv)}")
        if reply.rc is None:
            raise TimeoutError(f"{argv} did not finish within {timeout:.0f} s in the VM")
        result = subprocess.CompletedProcess(list(argv), reply.rc, reply.stdout, reply.stderr)
        if check and result.returncode:
            raise CommandFailed(result.returncode, list(argv), result.stdout, result.stderr)
        return result

    def _reply(self, ident: int, deadline: float, argv: Sequence[str]) -> _Reply:
        assert self._channel is not None
        while True:
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                reply = json.loads(line)
                if reply["id"] == ident:  # older ones answer requests that timed out here
                    return _Reply(reply["rc"], reply["stdout"], reply["stderr"])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no answer from the VM's agent to {argv}\n--- console:\n{self.console_tail()}"
                )
            self._channel.settimeout(left)
            with contextlib.suppress(TimeoutError):
                try:
                    chunk = self._channel.recv(65536)
                except ConnectionResetError:  # qemu gone too, as at EOF: say what it said
                    chunk = b""
                if not chunk:
                    raise RuntimeError(
                        f"the VM went away during {argv}\n--- qemu:\n{self._qemu_log()}"
                        f"--- console:\n{self.console_tail()}"
                    )
                self._pending += chunk

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.run(["sh", "-c", script, "sh", path, f"{mode:o}"], input=text)

    def poweroff(self, timeout: float = 120.0) -> None:
        """A clean power-off, as `systemctl poweroff` does it; qemu exits at the end."""
        qemu = self._qemu
        assert qemu is not None, "not running"
        start = time.monotonic()
        try:
            self.run(["systemctl", "poweroff", "--no-block"])
        except RuntimeError as err:
            # The power-off it asked for may stop the agent before its answer is out
            # (seen in CI): the VM going away is then what was wanted.
            if "the VM went away" not in str(err):
                raise
        try:
            qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"the VM did not power off within {timeout:.0f} s\n{self.console_tail()}"
            ) from None
        finally:
            self._stop()
        record(f"VM power-off #{self.boots}", time.monotonic() - start)

    def reboot(self) -> None:
        """Power off, then boot the same disk: what the host's admin sees after a reboot."""
        self.poweroff()
        self.boot()

    def _stop(self) -> None:
        qemu, self._qemu = self._qemu, None
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
        if qemu is not None:
            qemu.wait()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def close(self) -> None:
        """Kill qemu if it still runs; safe to call again."""
        atexit.unregister(self.close)
        self._stop()


@contextlib.contextmanager
def fresh_vm(kernel: Kernel, base: Path, images: Sequence[Path]) -> Iterator[VM]:
    """A new disk from `base` and a booted VM on it; everything is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="nspawnctl-vm-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        with timed("VM disk made (layer + mkfs.ext4 -d)"):
            stage_layer(work / "layer", images=images)
            make_disk(base, work / "layer", work / "disk.img")
        with VM(work / "disk.img", kernel, work) as vm:
            yield vm


def main() -> int:
    """python -m tests.vm.vmhost: build (or reuse) the base tree, boot a VM, run a
    command in it; for trying things out by hand."""
    kernel = check_prerequisites()
    base = ensure_base(kernel)
    with fresh_vm(kernel, base, []) as vm:
        argv = sys.argv[1:] or ["systemctl", "status", "--no-pager"]
        proc = vm.run(argv, check=False)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
