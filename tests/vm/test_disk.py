"""`resources.disk` on a fresh VM host: a guest that writes 1 GB into a 200M disk of its
own gets ENOSPC at about 200 MB, its `df /` says 200M, and the host and another
container go on writing; the limit stays through a snapshot, a rollback and a restart;
`set` grows it live and refuses to shrink it under a running guest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.vm.conftest import add_container, nspawnctl, ssh, unit_property, wait_stopped
from tests.vm.vmhost import VM, timed

LIMITED, FREE = "quota", "free"
PORTS = {LIMITED: 2401, FREE: 2402}
MB = 1 << 20


@pytest.fixture(scope="module")
def containers(vm: VM) -> Iterator[None]:
    for name, port in PORTS.items():
        add_container(vm, name, port, "resources: {disk: 200M}\n" if name == LIMITED else "")
    yield


def df_root(name: str, vm: VM) -> tuple[int, int]:
    """The guest's own `df /`: size and used, in bytes."""
    out = ssh(vm, PORTS[name], "df -B1 --output=size,used / | tail -1").stdout.split()
    return int(out[0]), int(out[1])


def leader(vm: VM, name: str) -> str:
    return unit_property(vm, f"systemd-nspawn@{name}.service", "MainPID")


def test_a_guest_fills_its_own_disk_and_nothing_else(vm: VM, containers: None) -> None:
    size, _used = df_root(LIMITED, vm)
    assert 180 * MB < size <= 200 * MB
    with timed("the guest writes 1 GB into its 200M disk", vm):
        out = ssh(
            vm,
            PORTS[LIMITED],
            "dd if=/dev/zero of=/root/big bs=1M count=1024 2>&1; stat -c %s /root/big",
            check=False,
        ).stdout
    assert "No space left on device" in out
    written = int(out.split()[-1])
    assert 150 * MB < written <= 200 * MB
    # Nothing outside it is touched: the host and another container still write.
    vm.run(["dd", "if=/dev/zero", "of=/var/tmp/host-file", "bs=1M", "count=64"])
    ssh(vm, PORTS[FREE], "dd if=/dev/zero of=/root/file bs=1M count=64 status=none")
    values = {
        (sample.name, sample.labels.get("container")): sample.value
        for family in text_string_to_metric_families(nspawnctl(vm, "metrics").stdout)
        for sample in family.samples
    }
    assert values[("nspawnctl_container_disk_limit_bytes", LIMITED)] == size
    assert values[("nspawnctl_container_disk_bytes", LIMITED)] > 150 * MB
    assert ("nspawnctl_container_disk_bytes", FREE) not in values
    ssh(vm, PORTS[LIMITED], "rm /root/big")


def test_the_limit_stays_through_a_snapshot_a_rollback_and_a_restart(
    vm: VM, containers: None
) -> None:
    ssh(vm, PORTS[LIMITED], "echo kept > /root/data")
    nspawnctl(vm, "stop", LIMITED)
    wait_stopped(vm, LIMITED)
    nspawnctl(vm, "snapshot", LIMITED, "before")
    assert ssh(vm, PORTS[LIMITED], "cat /root/data").stdout.strip() == "kept"  # a restart
    assert 180 * MB < df_root(LIMITED, vm)[0] <= 200 * MB
    ssh(vm, PORTS[LIMITED], "echo changed > /root/data")
    nspawnctl(vm, "stop", LIMITED)
    wait_stopped(vm, LIMITED)
    nspawnctl(vm, "rollback", LIMITED, "before")
    assert ssh(vm, PORTS[LIMITED], "cat /root/data").stdout.strip() == "kept"
    assert 180 * MB < df_root(LIMITED, vm)[0] <= 200 * MB
    # The old layer's disk went with it: one loop device, the one mounted now.
    images = vm.run(["losetup", "--noheadings", "-O", "BACK-FILE"]).stdout.split()
    assert [i for i in images if "/layers/" in i] == [
        f"/var/lib/nspawnctl/layers/{LIMITED}/disk.ext4"
    ]


def test_set_grows_the_disk_live_and_will_not_shrink_it_under_a_running_guest(
    vm: VM, containers: None
) -> None:
    ssh(vm, PORTS[LIMITED], "true")
    booted = leader(vm, LIMITED)
    nspawnctl(vm, "set", LIMITED, "resources.disk=400M")
    assert 380 * MB < df_root(LIMITED, vm)[0] <= 400 * MB
    assert leader(vm, LIMITED) == booted  # live: the same boot
    refused = nspawnctl(vm, "set", LIMITED, "resources.disk=300M", check=False)
    assert refused.returncode != 0
    assert "shrinks only unmounted" in refused.stderr
    assert 380 * MB < df_root(LIMITED, vm)[0] <= 400 * MB
    assert "disk: 400M" in vm.run(["cat", f"/etc/nspawnctl/{LIMITED}.yaml"]).stdout
