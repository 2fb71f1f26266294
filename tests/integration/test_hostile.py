"""A hostile guest, on real systemd: root in a container plays an attack on nspawnctl
through its own tree, then the admin runs the ordinary verbs that touch that tree. Host
canaries (files and directories of the host that a followed link, a pasted value or a
path named by the guest would reach) show that nothing of the host was read, written,
deleted, chowned or run. SECURITY in nspawnctl(1) is the threat model."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from subprocess import PIPE

import pytest

from tests.integration.conftest import CLIENT_KEY, STATE_IN_HOST, nspawnctl, ssh, ssh_argv
from tests.integration.test_core import leftovers, unit_state, wait_stopped
from tests.testhost import TestHost

SECRET = "HOST-SECRET-4f1c9e"  # in host files a followed link would copy or print
CANARY = "/var/tmp/canary"  # host files and directories the guest aims at
FLEET = "/var/tmp/fleet"  # an `apply` directory


def yaml(port: int, *extra: str) -> str:
    return "\n".join([f"ssh: {{listen: {port}, authorized_keys: [{CLIENT_KEY}.pub]}}", *extra])


PORTS: dict[str, int] = {}


def add(host: TestHost, name: str, port: int, *extra: str) -> None:
    host.write_file(f"{FLEET}/{name}.yaml", yaml(port, *extra))
    nspawnctl(host, "add", name, "-f", f"{FLEET}/{name}.yaml")
    PORTS[name] = port


def in_guest(host: TestHost, name: str, script: str) -> str:
    """What root in the guest does, logged in over SSH (which boots the guest)."""
    return ssh(host, PORTS[name], script).stdout


def stop(host: TestHost, name: str) -> None:
    nspawnctl(host, "stop", name)
    wait_stopped(host, name)


def snapshot_of_canaries(host: TestHost) -> str:
    """Every canary file with owner, mode and content: equal before and after, or the
    host was touched."""
    return host.run(
        ["sh", "-c", f"cd {CANARY} && find . -printf '%p %U:%G %m %s\\n' | sort && cat */*"]
    ).stdout


@pytest.fixture(scope="module")
def canaries(host: TestHost) -> Iterator[str]:
    script = f"""
        mkdir -p {CANARY}/ssh {CANARY}/units {CANARY}/dir
        echo '{SECRET} host key' > {CANARY}/ssh/authorized_keys
        echo '{SECRET}' > {CANARY}/secret
        echo 'keep me' > {CANARY}/dir/file
        chmod 600 {CANARY}/secret
    """
    host.run(["sh", "-c", script])
    before = snapshot_of_canaries(host)
    yield before
    assert snapshot_of_canaries(host) == before, "a host canary was touched"
    assert host.run(["ls", "/var/tmp/pwned"], check=False).returncode != 0


def test_machine_id_is_the_hosts_and_never_read_back(host: TestHost, canaries: str) -> None:
    add(host, "mid", 2601)
    kept = host.run(["cat", f"{STATE_IN_HOST}/layers/mid/machine-id"]).stdout.strip()
    # A newline that would start a directive of its own, and a path to a host directory.
    in_guest(
        host,
        "mid",
        f"printf '../../../..{CANARY}/dir\\nExecStartPre=/bin/touch /var/tmp/pwned\\n'"
        " > /etc/machine-id",
    )
    stop(host, "mid")
    # Each re-renders the host's units; status and logs read the id.
    nspawnctl(host, "set", "mid", "resources.memory=300M")
    host.write_file(f"{FLEET}/mid.yaml", yaml(2601, "hostname: mid2"))
    nspawnctl(host, "apply", FLEET)
    nspawnctl(host, "status", "mid")
    nspawnctl(host, "logs", "mid", "-n", "1")
    find = "find /etc/systemd/system /etc/systemd/nspawn -path '*mid*' -type f -exec cat {} +"
    units = host.run(["sh", "-c", find]).stdout
    assert kept in units
    assert "pwned" not in units and "canary" not in units
    # The guest's file itself was put back by apply: it names its journal directory.
    assert in_guest(host, "mid", "cat /etc/machine-id") == kept + "\n"
    nspawnctl(host, "remove", "mid")
    assert leftovers(host, "mid") == []


@pytest.mark.parametrize(
    ("where", "link"),
    [
        # absolute: the host's path, seen from the host
        ("/etc/ssh/sshd_config.d", f"{CANARY}/ssh"),
        ("/etc/systemd/system", f"{CANARY}/units"),
        ("/etc/hostname", f"../../../../../../..{CANARY}/secret"),  # relative, climbing
        ("/usr/local/libexec", f"{CANARY}/dir"),
    ],
)
def test_links_in_the_layer_are_refused_never_followed(
    host: TestHost, canaries: str, where: str, link: str
) -> None:
    add(host, "links", 2602)
    add(host, "good", 2603)
    in_guest(host, "links", f"rm -rf {where}; ln -s {link} {where}")
    stop(host, "links")
    # A changed YAML for both: the hostile one fails alone, the other is applied.
    for name, port in (("links", 2602), ("good", 2603)):
        host.write_file(f"{FLEET}/{name}.yaml", yaml(port, f"hostname: {name}-new"))
    dry = nspawnctl(host, "apply", "--dry-run", FLEET, check=False)
    assert SECRET not in dry.stdout + dry.stderr
    real = nspawnctl(host, "apply", FLEET, check=False)
    assert real.returncode == 1, real.stdout + real.stderr
    assert "links:" in real.stderr and "link" in real.stderr
    assert SECRET not in real.stdout + real.stderr
    again = nspawnctl(host, "apply", "--dry-run", FLEET, check=False).stdout
    assert "~ good" not in again  # the good one was applied
    for verb in (["snapshot", "links", "s1"], ["status", "links"], ["list"]):
        out = nspawnctl(host, *verb, check=False)
        assert SECRET not in out.stdout + out.stderr
    nspawnctl(host, "export", "links", "/var/tmp/links.tar")
    assert SECRET not in host.run(["tar", "-xOf", "/var/tmp/links.tar"], check=False).stdout
    for name in ("links", "good"):
        nspawnctl(host, "remove", name)
        host.run(["rm", "-f", f"{FLEET}/{name}.yaml"])
    assert leftovers(host, "links") == []


def test_a_deep_tree_and_a_huge_sparse_file_are_nothing_special(
    host: TestHost, canaries: str
) -> None:
    add(host, "shape", 2604)
    in_guest(
        host,
        "shape",
        "deep=/root/$(printf 'd/%.0s' $(seq 1500)); mkdir -p $deep; touch $deep/bottom;"
        " truncate -s 15T /root/sparse",
    )
    stop(host, "shape")
    status = nspawnctl(host, "status", "shape", "--json")
    assert '"layer"' in status.stdout
    nspawnctl(host, "snapshot", "shape", "deep")
    nspawnctl(host, "list")
    # Sparse stays sparse: 15 TiB of holes are neither read nor written.
    nspawnctl(host, "export", "shape", "/var/tmp/shape.tar.zst", timeout=300)
    size = int(host.run(["stat", "--format=%s", "/var/tmp/shape.tar.zst"]).stdout)
    assert size < 50 * 2**20
    nspawnctl(host, "snapshot", "--remove", "shape", "deep")
    nspawnctl(host, "remove", "shape")
    assert leftovers(host, "shape") == []
    nspawnctl(host, "import", "/var/tmp/shape.tar.zst", "shape2", timeout=300)
    nspawnctl(host, "remove", "shape2")
    assert leftovers(host, "shape2") == []
    host.run(["rm", "-f", "/var/tmp/shape.tar.zst"])


def test_a_hostile_quiesce_does_not_hold_stop(host: TestHost, canaries: str) -> None:
    add(host, "slow", 2605)
    ssh(host, 2605, "true")
    # The guest's root replaces the script the host asks it to run before a power-off,
    # and lifts the guest's own time limit on it.
    in_guest(
        host,
        "slow",
        "printf '#!/bin/sh\\nexec sleep 1000\\n' > /usr/local/libexec/nspawnctl-quiesce;"
        " mkdir -p /etc/systemd/system/nspawnctl-quiesce.service.d;"
        " printf '[Service]\\nTimeoutStartSec=infinity\\n'"
        " > /etc/systemd/system/nspawnctl-quiesce.service.d/x.conf; systemctl daemon-reload",
    )
    nspawnctl(host, "stop", "slow", timeout=60)
    wait_stopped(host, "slow")
    assert unit_state(host, "systemd-nspawn@slow.service")[0] == "inactive"
    ssh(host, 2605, "true")  # and the next connection boots it again
    removed = nspawnctl(host, "remove", "slow", check=False, timeout=90)
    status = host.run(
        ["systemctl", "status", "var-lib-machines-slow.mount", "systemd-nspawn@slow"], check=False
    ).stdout
    assert removed.returncode == 0, removed.stderr + status


def test_a_guest_that_never_powers_off_is_killed_and_ends_stopped(
    host: TestHost, canaries: str
) -> None:
    add(host, "hang", 2611, "stop_timeout: 3s")
    # Its shutdown never ends: a service whose stop sleeps for ever, the guest's own time
    # limit on it lifted.
    in_guest(
        host,
        "hang",
        "printf '[Service]\\nType=oneshot\\nRemainAfterExit=yes\\nExecStart=/bin/true\\n"
        "ExecStop=/bin/sleep infinity\\nTimeoutStopSec=infinity\\n'"
        " > /etc/systemd/system/hang.service && systemctl start hang.service",
    )
    nspawnctl(host, "stop", "hang", timeout=90)
    wait_stopped(host, "hang")
    unit = "systemd-nspawn@hang.service"
    assert unit_state(host, unit) == ("inactive", "dead")
    assert host.run(["systemctl", "show", "-P", "Result", unit]).stdout.strip() == "success"
    journal = host.run(["journalctl", "-u", unit, "-o", "cat", "--no-pager"]).stdout
    assert "Sent signal SIGKILL to main process" in journal, journal  # killed, not powered off
    assert "hang" in ssh(host, 2611, "hostname").stdout  # the next connection boots it


def test_a_container_without_its_settings_refuses_to_boot(host: TestHost) -> None:
    add(host, "bare", 2606)
    # machinectl remove deletes the .nspawn file (and the empty mount point).
    host.run(["machinectl", "remove", "bare"])
    assert host.run(["ls", "/etc/systemd/nspawn/bare.nspawn"], check=False).returncode != 0
    started = nspawnctl(host, "start", "bare", check=False)
    assert started.returncode != 0
    assert "bare" not in host.run(["machinectl", "list", "--no-legend"]).stdout
    # apply puts the settings back, and it boots confined again.
    nspawnctl(host, "apply", FLEET)
    uid_map = ssh(host, 2606, "cat /proc/self/uid_map").stdout.split()
    assert uid_map[1] != "0"
    nspawnctl(host, "remove", "bare")
    host.run(["rm", "-f", f"{FLEET}/bare.yaml"])


def test_an_unprivileged_host_user_cannot_enter_the_store(host: TestHost) -> None:
    add(host, "priv", 2607)
    ssh(host, 2607, "true")  # running: its root is mounted, its image ID-mapped
    for directory in (
        STATE_IN_HOST,
        f"{STATE_IN_HOST}/images",
        f"{STATE_IN_HOST}/layers",
        f"{STATE_IN_HOST}/snapshots",
        "/var/lib/machines",
        "/run/nspawnctl",
    ):
        mode = host.run(["stat", "--format=%a %U", directory]).stdout.split()
        assert mode == ["700", "root"], directory
        probe = host.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", directory],
            check=False,
        )
        assert probe.returncode != 0, directory
    nspawnctl(host, "remove", "priv")


def test_an_archive_with_a_set_uid_root_file_is_refused_whole(host: TestHost) -> None:
    add(host, "suid", 2608)
    stop(host, "suid")
    nspawnctl(host, "export", "suid", "/var/tmp/suid.tar")
    # The archive as an attacker hands it over: one more member, set-uid host root.
    script = """
import io, tarfile
with tarfile.open('/var/tmp/suid.tar', 'a') as t:
    info = tarfile.TarInfo('upper/usr/local/bin/rootshell')
    info.mode, info.uid, info.gid, info.size = 0o4755, 0, 0, 4
    t.addfile(info, io.BytesIO(b'#!/x'))
"""
    host.run(["python3", "-c", script])
    imported = nspawnctl(host, "import", "/var/tmp/suid.tar", "suid2", check=False)
    assert imported.returncode == 1
    assert "set-uid 0" in imported.stderr
    assert leftovers(host, "suid2") == []
    found = host.run(["sh", "-c", f"ls -a {STATE_IN_HOST}/layers | grep suid2 || true"]).stdout
    assert found == ""
    nspawnctl(host, "remove", "suid")
    host.run(["rm", "-f", "/var/tmp/suid.tar", f"{FLEET}/suid.yaml"])


def test_remove_works_on_a_full_file_system(host: TestHost) -> None:
    """A guest that fills the state file system does not lock the admin out: `stop`,
    `status` and `remove` of it still work (remove's write-ahead record has no room)."""
    add(host, "full", 2609)
    stop(host, "full")
    state = STATE_IN_HOST
    # Its layer and the records on a small file system of their own, then filled up to
    # the last inode, as a guest would fill the real one.
    script = f"""
        mkdir -p /var/tmp/small && mount -t tmpfs -o size=8M,nr_inodes=400 tmpfs /var/tmp/small
        mkdir /var/tmp/small/layers /var/tmp/small/intents
        cp -a {state}/layers/full /var/tmp/small/layers/full
        mount --bind /var/tmp/small/layers {state}/layers
        mkdir -p {state}/intents && mount --bind /var/tmp/small/intents {state}/intents
        i=0; while touch /var/tmp/small/layers/full/upper/f$i 2>/dev/null; do i=$((i+1)); done
    """
    host.run(["sh", "-c", script], timeout=120)
    try:
        assert host.run(["touch", f"{state}/intents/x"], check=False).returncode != 0
        nspawnctl(host, "stop", "full")
        nspawnctl(host, "status", "full")
        nspawnctl(host, "remove", "full")
        assert leftovers(host, "full") == []
    finally:
        host.run(
            ["sh", "-c", f"umount {state}/intents; umount {state}/layers; umount /var/tmp/small"],
            check=False,
        )
    # The original layer, hidden under the small file system meanwhile.
    nspawnctl(host, "remove", "full")
    assert leftovers(host, "full") == []


def test_a_connection_during_a_verb_waits_and_is_served_after_it(host: TestHost) -> None:
    """A verb that needs the container stopped holds it stopped: a connection that
    arrives meanwhile boots nothing, waits in the host's socket, and is served once the
    verb is done. None is lost, and the verb's copy is of the stopped container."""
    add(host, "held", 2610)
    ssh(host, 2610, "echo written-before > /root/mark")
    stop(host, "held")
    # nspawnctl stops itself (SIGSTOP) at its first checkpoint, holding the container.
    argv = [sys.executable, "-m", "nspawnctl", "export", "held", "/var/tmp/held.tar"]
    verb = host.popen(argv, env={"NSPAWNCTL_PAUSE_AT": "1"}, stdout=PIPE, stderr=PIPE)
    pid = ""

    def paused() -> bool:
        nonlocal pid
        found = host.run(["pgrep", "-f", "nspawnctl export held"], check=False).stdout.split()
        states = [host.run(["ps", "-o", "stat=", "-p", p], check=False).stdout for p in found]
        pid = next((p for p, st in zip(found, states, strict=True) if st.startswith("T")), "")
        return bool(pid)

    host.wait_for(paused, timeout=60, what="nspawnctl export held, paused while holding")
    client = host.popen(ssh_argv(2610, "cat /root/mark"), stdout=PIPE, stderr=PIPE)
    gate = "nspawnctl-gate@held.service"
    host.wait_for(
        lambda: unit_state(host, gate)[0] == "activating",
        timeout=60,
        what="the connection's boot waiting at the gate",
    )
    assert "held" not in host.run(["machinectl", "list", "--no-legend"]).stdout
    assert unit_state(host, "systemd-nspawn@held.service")[0] == "inactive"
    host.run(["kill", "-CONT", pid])
    verb.send_signal(signal.SIGCONT)  # nsenter, out here, stopped itself with its child
    _out, err = verb.communicate(timeout=120)
    assert verb.returncode == 0, err
    served, _ = client.communicate(timeout=120)
    assert client.returncode == 0 and served.strip() == "written-before"
    manifest = host.run(["tar", "-xOf", "/var/tmp/held.tar", ".nspawnctl-export/manifest.json"])
    assert '"live": false' in manifest.stdout
    nspawnctl(host, "remove", "held")
    host.run(["rm", "-f", "/var/tmp/held.tar", f"{FLEET}/held.yaml"])
