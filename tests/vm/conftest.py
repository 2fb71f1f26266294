"""VM tests: a fresh VM host under qemu (tests/vm/vmhost.py) with nspawnctl from this
checkout installed, for what the throw-away nspawn host cannot show: resource limits
enforced by a unified cgroup hierarchy, and a host that powers off and boots again.
One VM per test module; the bootstrapped base tree is cached between runs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import cached_image
from tests.vm.vmhost import (
    CLIENT_KEY,
    TIMINGS,
    VM,
    Kernel,
    VMUnavailableError,
    check_prerequisites,
    ensure_base,
    fresh_vm,
    timed,
    wait_for,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.vm)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Printed on every run, CI's included, so the figures can be quoted.
    if TIMINGS:
        terminalreporter.section("VM tier timings")
        for what, seconds, cpu in TIMINGS:
            used = "" if cpu is None else f"  (qemu CPU {cpu:.1f} s)"
            terminalreporter.write_line(f"{seconds:7.1f} s  {what}{used}")


@pytest.fixture(scope="session")
def vm_kernel() -> Kernel:
    try:
        return check_prerequisites()
    except VMUnavailableError as e:
        pytest.skip(f"VM tier: {e}")


@pytest.fixture(scope="session")
def vm_base(vm_kernel: Kernel) -> Path:
    with timed("base tree ready (cached unless bootstrapped above)"):
        return ensure_base(vm_kernel)


@pytest.fixture(scope="session")
def container_images(vm_base: Path) -> list[Path]:
    """The cached debian:bookworm image (the integration tier's): the VM has no network."""
    return [cached_image().path]


@pytest.fixture(scope="module")
def vm(vm_kernel: Kernel, vm_base: Path, container_images: list[Path]) -> Iterator[VM]:
    with fresh_vm(vm_kernel, vm_base, container_images) as machine:
        yield machine


def nspawnctl(vm: VM, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The nspawnctl installed in the VM, from this checkout."""
    return vm.run(["nspawnctl", *args], check=check, timeout=300)


def add_container(vm: VM, name: str, port: int, extra: str = "") -> None:
    """Write NAME.yaml (the cached image, SSH on `port`, the test key, then `extra`
    lines) and add it."""
    vm.write_file(
        f"/etc/nspawnctl/{name}.yaml",
        f"image: debian:bookworm\nssh:\n  listen: {port}\n"
        f"  authorized_keys: [{CLIENT_KEY}.pub]\n{extra}",
    )
    with timed(f"nspawnctl add {name}", vm):
        nspawnctl(vm, "add", name)


def ssh(vm: VM, port: int, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """OpenSSH in the VM, connecting to the VM's own port (the container's socket)."""
    return vm.run(
        [
            "ssh",
            *("-p", str(port), "-i", CLIENT_KEY, "-o", "BatchMode=yes"),
            *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
            *("-o", "ConnectTimeout=120", "-o", "LogLevel=ERROR"),
            # Not the default post-quantum exchange (sntrup761): costly under emulation.
            *("-o", "KexAlgorithms=curve25519-sha256"),
            "root@127.0.0.1",
            command,
        ],
        check=check,
        timeout=240,
    )


def unit_property(vm: VM, unit: str, prop: str) -> str:
    return vm.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()


def machines(vm: VM) -> list[str]:
    out = vm.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_stopped(vm: VM, name: str, timeout: float = 180) -> None:
    unit = f"systemd-nspawn@{name}.service"
    wait_for(
        lambda: unit_property(vm, unit, "ActiveState") in ("inactive", "failed"),
        timeout=timeout,
        what=f"{unit} stopped",
        interval=0.5,
    )
