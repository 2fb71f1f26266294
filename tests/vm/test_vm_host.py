"""On a fresh VM host booted from power-on: add a container, reach it over SSH (which
boots it), stop it; then the "host rebooted" fault: an enabled container's socket
listens again after a power-off and a boot, with its data intact, and nothing has to
run nspawnctl for that."""

from __future__ import annotations

from tests.vm.conftest import machines, nspawnctl, ssh, unit_property, wait_stopped
from tests.vm.vmhost import CLIENT_KEY, VM, timed

PORT = 2222
OTHER_PORT = 2223  # a container that is added but not enabled


def socket_state(vm: VM, name: str) -> tuple[str, str]:
    unit = f"nspawnctl-{name}.socket"
    return unit_property(vm, unit, "ActiveState"), unit_property(vm, unit, "SubState")


def test_add_then_ssh_boots_the_container(vm: VM) -> None:
    with timed("nspawnctl add web (cached image)", vm):
        nspawnctl(vm, "add", "web", "--ssh", str(PORT), "--key", f"{CLIENT_KEY}.pub")
    assert socket_state(vm, "web") == ("active", "listening")
    assert "web" not in machines(vm)

    with timed("first ssh to web: socket activation boots it", vm):
        out = ssh(vm, PORT, "hostname; cat /proc/1/comm").stdout.split()
    assert out == ["web", "systemd"]
    assert "web" in machines(vm)
    # A real host: the container's cgroup sits in the unified hierarchy, under machine.slice.
    assert unit_property(vm, "systemd-nspawn@web.service", "ControlGroup") == (
        "/machine.slice/systemd-nspawn@web.service"
    )


def test_stop_leaves_the_socket_listening(vm: VM) -> None:
    ssh(vm, PORT, "true")
    nspawnctl(vm, "stop", "web")
    wait_stopped(vm, "web")
    assert "web" not in machines(vm)
    assert socket_state(vm, "web") == ("active", "listening")
    assert ssh(vm, PORT, "hostname").stdout.strip() == "web"


def test_a_live_snapshot_is_taken_frozen_and_a_kill_meanwhile_thaws_it(vm: VM) -> None:
    """`snapshot --force` of a running container copies its layer while the container
    is frozen (one instant, not file by file); nspawnctl killed while it is frozen
    leaves a record, and the next nspawnctl thaws it."""
    ssh(vm, PORT, "echo one > /root/state")
    leader = unit_property(vm, "systemd-nspawn@web.service", "MainPID")
    # Checkpoints: 1 the hold, 2 the thaw recorded, 3 the container frozen.
    killed = vm.run(
        ["env", "NSPAWNCTL_KILL_AT=3", "nspawnctl", "snapshot", "--force", "web", "cut"],
        check=False,
    )
    assert killed.returncode != 0 and "SIGKILL at freeze: web frozen" in killed.stderr
    assert unit_property(vm, "systemd-nspawn@web.service", "FreezerState") == "frozen"
    settled = nspawnctl(vm, "list")
    assert "took back an interrupted `freeze web`" in settled.stderr
    assert unit_property(vm, "systemd-nspawn@web.service", "FreezerState") == "running"
    assert ssh(vm, PORT, "cat /root/state").stdout == "one\n"

    taken = nspawnctl(vm, "snapshot", "--force", "web", "live")
    assert "cannot be frozen" not in taken.stderr, taken.stderr
    assert unit_property(vm, "systemd-nspawn@web.service", "FreezerState") == "running"
    assert unit_property(vm, "systemd-nspawn@web.service", "MainPID") == leader
    copied = "/var/lib/nspawnctl/snapshots/web/live/upper/root/state"
    assert vm.run(["cat", copied]).stdout == "one\n"


def test_enabled_container_comes_back_after_a_host_reboot(vm: VM) -> None:
    nspawnctl(vm, "enable", "web")
    nspawnctl(vm, "add", "other", "--ssh", str(OTHER_PORT), "--key", f"{CLIENT_KEY}.pub")
    # Written while the container runs; the host's shutdown stops the container.
    ssh(vm, PORT, "echo written-before-the-reboot > /root/data")
    boot_before = vm.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout

    with timed("host reboot: power-off + boot"):
        vm.reboot()

    assert vm.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout != boot_before
    # Nobody ran nspawnctl since the boot: systemd brought the enabled socket up alone.
    assert socket_state(vm, "web") == ("active", "listening")
    assert "web" not in machines(vm)  # sleeping until a connection comes
    # `other` was never enabled: its socket stays down until someone starts it.
    assert socket_state(vm, "other")[0] == "inactive"
    ssh_other = ssh(vm, OTHER_PORT, "true", check=False)
    assert ssh_other.returncode == 255  # connection refused: nothing listens

    with timed("first ssh to web after the reboot", vm):
        assert ssh(vm, PORT, "cat /root/data").stdout == "written-before-the-reboot\n"
    assert "web" in machines(vm)
