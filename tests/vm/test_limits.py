"""`resources:` enforced on a real host with a unified cgroup hierarchy: a memory hog,
a fork bomb and a busy loop are held to their container's limits, while the host and
another container go on untouched. And `resources.disk`: a guest that writes 1 GB into
a 200M disk of its own gets ENOSPC at about 200 MB, its `df /` says 200M, the host and
another container go on writing; the limit stays through a snapshot, a rollback and a
restart; `set` grows it live and refuses to shrink it under a running guest."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.vm.conftest import add_container, nspawnctl, ssh, unit_property, wait_stopped
from tests.vm.vmhost import VM, timed, wait_for

LIMITED, CALM, BUSY = "limited", "calm", "busy"
PORTS = {LIMITED: 2301, CALM: 2302, BUSY: 2303}
# The CPU quota has a container of its own. It boots without the quota, in the
# background while the other tests run, and gets `cpu: 20%` from a live `set` once up:
# a boot held to 20% of an emulated CPU needs over five minutes under CI's load, which
# is longer than systemd-nspawn@.service waits for it.
RESOURCES = {
    LIMITED: "{memory: 128M, tasks: 300, io_weight: 100, disk: 200M}",
    CALM: None,
    BUSY: None,
}
HOST_SERVICES = ("systemd-journald", "dbus", "systemd-logind", "systemd-machined", "systemd-udevd")


def cgroup(name: str) -> str:
    return f"/sys/fs/cgroup/machine.slice/systemd-nspawn@{name}.service"


def read(vm: VM, path: str) -> str:
    return vm.run(["cat", path]).stdout


def events(vm: VM, name: str, file: str) -> dict[str, int]:
    """memory.events, pids.events: `key count` lines."""
    return {
        k: int(v)
        for k, v in (line.split() for line in read(vm, f"{cgroup(name)}/{file}").splitlines())
    }


def leader(vm: VM, name: str) -> str:
    return vm.run(["machinectl", "show", "--property=Leader", "--value", name]).stdout.strip()


def in_container(vm: VM, name: str, unit: str, script: str) -> None:
    """Start `script` as a unit of the container's own systemd, from the host (cheaper
    than an SSH login under emulation)."""
    vm.run(["systemd-run", f"--machine={name}", f"--unit={unit}", "--quiet", "sh", "-c", script])


@pytest.fixture(scope="module")
def containers(vm: VM) -> Iterator[None]:
    for name, port in PORTS.items():
        limits = f"resources: {RESOURCES[name]}\n" if RESOURCES[name] else ""
        add_container(vm, name, port, limits)
    # Its boot goes on while the others are used; test_cpu_quota waits for it.
    vm.run(["systemctl", "start", "--no-block", f"systemd-nspawn@{BUSY}.service"])
    for name in (LIMITED, CALM):
        with timed(f"first ssh to {name}: boots it", vm):
            assert ssh(vm, PORTS[name], "hostname").stdout.strip() == name
    yield


def refused_forks(vm: VM) -> list[str]:
    """The cgroups the kernel has logged a fork refused by a pids limit in."""
    argv = ["journalctl", "-k", "--no-pager", "-o", "cat", "-g", "fork rejected"]
    kernel = vm.run(argv, check=False)  # exit code 1: no such line yet
    found = re.findall(r"fork rejected by pids controller in (\S+)", kernel.stdout)
    return [f"/sys/fs/cgroup{path}" for path in found]


def assert_bystanders_untouched(vm: VM, calm_leader: str) -> None:
    """The host's own services and the other container went on as if nothing happened."""
    for service in HOST_SERVICES:
        assert unit_property(vm, f"{service}.service", "ActiveState") == "active", service
    assert ssh(vm, PORTS[CALM], "hostname").stdout.strip() == CALM
    assert leader(vm, CALM) == calm_leader  # the same boot of it, not a restarted one
    assert events(vm, CALM, "memory.events")["oom_kill"] == 0


def test_limits_reach_the_kernel(vm: VM, containers: None) -> None:
    assert read(vm, f"{cgroup(LIMITED)}/memory.max").strip() == str(128 << 20)
    assert read(vm, f"{cgroup(LIMITED)}/pids.max").strip() == "300"
    assert read(vm, f"{cgroup(LIMITED)}/io.weight").strip() == "default 100"
    assert read(vm, f"{cgroup(LIMITED)}/cpu.max").strip() == "max 100000"
    assert read(vm, f"{cgroup(CALM)}/memory.max").strip() == "max"
    assert read(vm, f"{cgroup(CALM)}/pids.max").strip() != "300"  # the stock TasksMax


def test_metrics_show_what_the_kernel_counts_for_each_container(vm: VM, containers: None) -> None:
    """On a unified hierarchy every control-group figure of `nspawnctl metrics` is there,
    read by Prometheus's own parser, and the limit is the one the kernel holds."""
    values = {
        (sample.name, sample.labels.get("container")): sample.value
        for family in text_string_to_metric_families(nspawnctl(vm, "metrics").stdout)
        for sample in family.samples
        if set(sample.labels) <= {"container"}
    }
    for name in (LIMITED, CALM):
        assert values[("nspawnctl_container_memory_bytes", name)] > 1 << 20
        assert values[("nspawnctl_container_tasks", name)] >= 3  # init, journald, sshd
        assert values[("nspawnctl_container_cpu_seconds_total", name)] > 0
        assert ("nspawnctl_container_io_read_bytes_total", name) in values
        assert values[("nspawnctl_container_cold_starts_total", name)] >= 1
    assert values[("nspawnctl_container_memory_limit_bytes", LIMITED)] == 128 << 20
    assert ("nspawnctl_container_memory_limit_bytes", CALM) not in values  # no limit


def test_memory_hog_is_oom_killed_inside_its_container(vm: VM, containers: None) -> None:
    calm_leader, limited_leader = leader(vm, CALM), leader(vm, LIMITED)
    since = vm.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    with timed("memory: 128M hog until the OOM kill", vm):
        in_container(vm, LIMITED, "hog", "tail /dev/zero")
        wait_for(
            lambda: events(vm, LIMITED, "memory.events")["oom_kill"] >= 1,
            timeout=120,
            what="the OOM kill in the limited container",
            interval=1,
        )
    kernel = vm.run(["journalctl", "-k", "--no-pager", "-o", "cat", f"--since={since}"]).stdout
    kills = re.findall(r"oom-kill:.*oom_memcg=(\S+?),task_memcg=(\S+?),task=(\S+?),", kernel)
    # The kernel's cgroup OOM killer took `tail`, judged against the container's limit.
    assert kills, kernel
    assert {(memcg, task) for memcg, _task_memcg, task in kills} == {
        ("/machine.slice/systemd-nspawn@limited.service", "tail")
    }
    assert all(
        cg.startswith(f"{cgroup(LIMITED).removeprefix('/sys/fs/cgroup')}/") for _m, cg, _t in kills
    )
    assert_bystanders_untouched(vm, calm_leader)
    # One process died, not the container: the same boot of it still serves logins.
    assert unit_property(vm, "systemd-nspawn@limited.service", "ActiveState") == "active"
    assert ssh(vm, PORTS[LIMITED], "hostname").stdout.strip() == LIMITED
    assert leader(vm, LIMITED) == limited_leader


def test_fork_bomb_is_stopped_by_the_task_limit(vm: VM, containers: None) -> None:
    ssh(vm, PORTS[LIMITED], "true")  # running, whatever the tests before left
    calm_leader = leader(vm, CALM)
    with timed("tasks: 300 fork bomb until forks fail", vm):
        # The main process stays (exec: no fork needed), or the unit would end and its
        # stop would kill the bomb at once.
        in_container(vm, LIMITED, "bomb", "b() { b | b & }; b; exec sleep infinity")
        wait_for(
            lambda: bool(refused_forks(vm)),
            timeout=120,
            what="a fork refused in the limited container",
            interval=1,
        )
    # Refused by the container's limit, in the bomb's own cgroup (where the kernel counts).
    bomb = f"{cgroup(LIMITED)}/payload/system.slice/bomb.service"
    assert refused_forks(vm) == [bomb]
    # ... and by the container's limit of 300, not a lower one of the bomb's own unit.
    own = read(vm, f"{bomb}/pids.max").strip()
    assert own == "max" or int(own) > 300, own
    assert int(read(vm, f"{cgroup(LIMITED)}/pids.current")) <= 300
    vm.run(["systemd-run", "--wait", "--quiet", "true"])  # the host still starts things
    assert_bystanders_untouched(vm, calm_leader)

    # The container's own systemd is still in charge: it ends the bomb, and the
    # container serves logins again, in the same boot.
    limited_leader = leader(vm, LIMITED)
    with timed("fork bomb stopped by the container's systemd", vm):
        vm.run(["systemctl", f"--machine={LIMITED}", "stop", "bomb.service"], timeout=300)
    assert int(read(vm, f"{cgroup(LIMITED)}/pids.current")) < 50
    assert ssh(vm, PORTS[LIMITED], "hostname").stdout.strip() == LIMITED
    assert leader(vm, LIMITED) == limited_leader


def _usage(vm: VM) -> tuple[float, dict[str, float]]:
    """(the VM's uptime, CPU seconds of BUSY and CALM), read in one go."""
    script = 'cat /proc/uptime; for f; do grep usage_usec "$f"; done'
    paths = [f"{cgroup(name)}/cpu.stat" for name in (BUSY, CALM)]
    lines = vm.run(["sh", "-c", script, "sh", *paths]).stdout.splitlines()
    used = {
        name: int(line.split()[1]) / 1e6 for name, line in zip((BUSY, CALM), lines[1:], strict=True)
    }
    return float(lines[0].split()[0]), used


def test_cpu_quota_holds_a_busy_loop_near_its_share(vm: VM, containers: None) -> None:
    with timed("busy finishing its boot", vm):
        # Until the container's bus is up this fails at once; then it waits for the boot.
        argv = ["systemctl", f"--machine={BUSY}", "is-system-running", "--wait"]
        try:
            wait_for(
                lambda: (
                    vm.run(argv, check=False, timeout=300).stdout.strip() in ("running", "degraded")
                ),
                timeout=300,
                what=f"{BUSY} booted",
                interval=2,
            )
        except TimeoutError:
            units = [f"systemd-nspawn@{BUSY}.service", f"nspawnctl-gate@{BUSY}.service"]
            status = vm.run(["systemctl", "status", "--no-pager", "-l", *units], check=False)
            jobs = vm.run(["systemctl", "list-jobs", "--no-pager"], check=False)
            raise AssertionError(f"{status.stdout}\n{jobs.stdout}") from None
    busy_leader = leader(vm, BUSY)
    nspawnctl(vm, "set", BUSY, "resources.cpu=20%")
    assert read(vm, f"{cgroup(BUSY)}/cpu.max").strip() == "20000 100000"
    assert leader(vm, BUSY) == busy_leader  # the running boot got it, no restart
    # The same loop in both: the unlimited one shows what the limited one would take.
    for name in (BUSY, CALM):
        in_container(vm, name, "spin", "while :; do :; done")
    try:
        start, before = _usage(vm)
        now, after = start, before

        def busy_used_two_seconds() -> bool:
            nonlocal now, after
            now, after = _usage(vm)
            return after[BUSY] - before[BUSY] >= 2.0

        with timed("cpu: 20% measured until 2 s of CPU used", vm):
            wait_for(busy_used_two_seconds, timeout=120, what="2 s of CPU used", interval=1)
        share = {name: (after[name] - before[name]) / (now - start) for name in (BUSY, CALM)}
        print(f"CPU over {now - start:.1f} s: busy {share[BUSY]:.0%}, calm {share[CALM]:.0%}")
        assert 0.10 <= share[BUSY] <= 0.35
        assert share[CALM] >= 0.5
    finally:
        for name in (BUSY, CALM):
            vm.run(["systemctl", f"--machine={name}", "stop", "spin.service"])


def test_set_and_apply_change_a_running_containers_limits_in_the_kernel(
    vm: VM, containers: None
) -> None:
    """`set` and an `apply` that changes only `resources:` both reach the running
    container's cgroup: the same boot of it, the new limit in the kernel's file, and no
    runtime copy of it in /run/systemd/system.control to outrank the YAML later."""
    calm_leader = leader(vm, CALM)
    nspawnctl(vm, "set", CALM, "resources.memory=200M")
    assert read(vm, f"{cgroup(CALM)}/memory.max").strip() == str(200 << 20)
    yaml = read(vm, f"/etc/nspawnctl/{CALM}.yaml")
    vm.write_file(f"/etc/nspawnctl/{CALM}.yaml", yaml.replace("200M", "300M"))
    applied = nspawnctl(vm, "apply").stdout
    assert "restart" not in applied, applied
    assert read(vm, f"{cgroup(CALM)}/memory.max").strip() == str(300 << 20)
    nspawnctl(vm, "set", CALM, "resources.memory=", "resources.tasks=400")
    assert read(vm, f"{cgroup(CALM)}/memory.max").strip() == "max"
    assert read(vm, f"{cgroup(CALM)}/pids.max").strip() == "400"
    assert leader(vm, CALM) == calm_leader
    control = vm.run(["ls", "-A", "/run/systemd/system.control"], check=False).stdout
    assert f"systemd-nspawn@{CALM}" not in control


MB = 1 << 20


def df_root(name: str, vm: VM) -> tuple[int, int]:
    """The guest's own `df /`: size and used, in bytes."""
    out = ssh(vm, PORTS[name], "df -B1 --output=size,used / | tail -1").stdout.split()
    return int(out[0]), int(out[1])


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
    ssh(vm, PORTS[CALM], "dd if=/dev/zero of=/root/file bs=1M count=64 status=none")
    values = {
        (sample.name, sample.labels.get("container")): sample.value
        for family in text_string_to_metric_families(nspawnctl(vm, "metrics").stdout)
        for sample in family.samples
    }
    assert values[("nspawnctl_container_disk_limit_bytes", LIMITED)] == size
    assert values[("nspawnctl_container_disk_bytes", LIMITED)] > 150 * MB
    assert ("nspawnctl_container_disk_bytes", CALM) not in values
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
    # ext4's overhead grows with it: 377 MiB of 400 were free to the guest.
    assert 360 * MB < df_root(LIMITED, vm)[0] <= 400 * MB
    assert leader(vm, LIMITED) == booted  # live: the same boot
    refused = nspawnctl(vm, "set", LIMITED, "resources.disk=300M", check=False)
    assert refused.returncode != 0
    assert "shrinks only unmounted" in refused.stderr
    assert 360 * MB < df_root(LIMITED, vm)[0] <= 400 * MB
    assert "disk: 400M" in vm.run(["cat", f"/etc/nspawnctl/{LIMITED}.yaml"]).stdout


def test_export_remove_and_import_keep_the_disk_and_its_files(vm: VM, containers: None) -> None:
    ssh(vm, PORTS[LIMITED], "echo exported > /root/data")
    nspawnctl(vm, "stop", LIMITED)
    wait_stopped(vm, LIMITED)
    nspawnctl(vm, "export", LIMITED, "/var/tmp/limited.tar")
    nspawnctl(vm, "remove", LIMITED)
    # Its disk went with it: unmounted, its loop device freed, its image deleted.
    assert f"/layers/{LIMITED}/" not in vm.run(["losetup", "-a"]).stdout
    assert f"/layers/{LIMITED}/" not in vm.run(["cat", "/proc/self/mountinfo"]).stdout
    nspawnctl(vm, "import", "/var/tmp/limited.tar")
    assert ssh(vm, PORTS[LIMITED], "cat /root/data").stdout.strip() == "exported"
    assert 360 * MB < df_root(LIMITED, vm)[0] <= 400 * MB  # the YAML's, grown by `set`
