"""`nspawnctl logs` against a guest whose root forges its journal: entries claiming
another container's or the host's fields, escape sequences, and files planted in its
journal directory on the host (symlinks to the host's journal and to /dev/zero, a FIFO,
a sparse terabyte, names with escapes, a deep tree). Entries are told by the directory
they come from, which the guest cannot choose; every wait is bounded."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from subprocess import PIPE

import pytest

from nspawnctl.journal import field_text
from tests.integration.conftest import CLIENT_KEY, nspawnctl, ssh
from tests.testhost import TestHost, _kill_inside

FORGER, VICTIM = "forger", "victim"
PORTS = {FORGER: 2711, VICTIM: 2712}
# Generous for a command that reads a few small journals; a hang would hit it.
BOUND = 60.0


def add(host: TestHost, name: str) -> None:
    text = f"ssh: {{listen: {PORTS[name]}, authorized_keys: [{CLIENT_KEY}.pub]}}\n"
    host.write_file(f"/var/tmp/{name}.yaml", text)
    nspawnctl(host, "add", name, "-f", f"/var/tmp/{name}.yaml")


def in_guest(host: TestHost, name: str, script: str) -> str:
    return ssh(host, PORTS[name], script).stdout


def machine_id(host: TestHost, name: str) -> str:
    code = (
        "import sys; from nspawnctl.container import machine_id; "
        "from nspawnctl.paths import Paths; print(machine_id(Paths.from_env(), sys.argv[1]))"
    )
    return host.run([sys.executable, "-c", code, name]).stdout.strip()


def logs(host: TestHost, *args: str) -> str:
    """`nspawnctl logs ARGS`, bounded in time, checked to put no raw escape on stdout."""
    started = time.monotonic()
    out = host.run([sys.executable, "-m", "nspawnctl", "logs", *args], timeout=BOUND)
    took = time.monotonic() - started
    print(f"logs {' '.join(args)}: {took:.2f} s, {len(out.stdout)} bytes")
    assert "\x1b" not in out.stdout and "\x9b" not in out.stdout
    assert "\x1b" not in out.stderr
    return out.stdout


def sources_of(host: TestHost, marker: str, *args: str) -> set[str]:
    """The source nspawnctl names for each entry with `marker` (JSON output)."""
    found = set()
    for line in logs(host, *args, "-o", "json").splitlines():
        entry = json.loads(line)
        if marker in (field_text(entry.get("MESSAGE")) or ""):
            found.add(entry["__NSPAWNCTL_SOURCE"])
    return found


@pytest.fixture(scope="module")
def pair(host: TestHost) -> Iterator[dict[str, str]]:
    """Both containers booted; their machine-ids, and the host's, by name."""
    for name in (FORGER, VICTIM):
        add(host, name)
        ssh(host, PORTS[name], "true")
    ids = {name: machine_id(host, name) for name in (FORGER, VICTIM)}
    ids["host"] = host.run(["cat", "/etc/machine-id"]).stdout.strip()
    yield ids


def test_forged_fields_stay_with_the_forger(host: TestHost, pair: dict[str, str]) -> None:
    host.run(["logger", "-t", "hostcanary", "host-canary-1"])
    in_guest(host, VICTIM, "logger -t victimtag victim-own-1")
    in_guest(
        host,
        FORGER,
        # Claims to be the victim by hostname, by unit (its own transient unit of that
        # name, and a UNIT= field) and by identifier; and hides in escape sequences.
        "hostname victim; logger -t sshd forged-hostname-1; hostname forger\n"
        "printf 'MESSAGE=forged-unit-field-1\\nSYSLOG_IDENTIFIER=systemd\\n"
        "UNIT=systemd-nspawn@victim.service\\nUNIT=nspawnctl-victim.socket\\n'"
        " | logger --journald\n"
        "systemd-run --quiet --wait --unit=systemd-nspawn@victim.service "
        "echo forged-systemd-unit-1\n"
        "logger -t hostcanary \"$(printf 'forged-escape-1 \\033[2J\\033]0;t\\007\\033[31m')\"\n"
        # Its console goes to the host's journal, written there by its nspawn process.
        "echo forged-console-1 > /dev/console\n",
    )
    markers = ["forged-hostname-1", "forged-unit-field-1", "forged-systemd-unit-1"]
    markers += ["forged-escape-1", "forged-console-1"]

    def all_there() -> bool:
        out = logs(host, "--all", "-n", "3000")
        return all(m in out for m in [*markers, "host-canary-1", "victim-own-1"])

    host.wait_for(all_there, timeout=30, what="every entry in logs --all")
    victims = logs(host, VICTIM, "-n", "3000")
    assert "victim-own-1" in victims
    for marker in markers:
        assert marker not in victims, marker
        assert sources_of(host, marker, "--all", "-n", "3000") == {FORGER}, marker
    assert sources_of(host, "host-canary-1", "--all", "-n", "3000") == {".host"}
    assert sources_of(host, "victim-own-1", "--all", "-n", "3000") == {VICTIM}
    # The short format names the source as nspawnctl knows it, whatever the fields say.
    for line in logs(host, "--all", "-n", "3000", "-o", "short-unix").splitlines():
        if any(m in line for m in markers):
            assert line.split()[1] == FORGER, line
        if "host-canary-1" in line:
            assert line.split()[1] == "testhost", line
    assert "\\x1b[2J" in logs(host, FORGER, "-n", "3000")
    assert "host-canary-1" not in logs(host, FORGER, "-n", "3000")


def test_a_forged_machine_id_stays_with_the_forger(host: TestHost, pair: dict[str, str]) -> None:
    """The guest's root restarts its journald with the victim's machine-id (bind-mounted
    over its /etc/machine-id), writing into its own directory on the host: every entry
    then carries _MACHINE_ID of the victim, which the old `journalctl -m _MACHINE_ID=`
    showed as the victim's."""
    own, victim = pair[FORGER], pair[VICTIM]
    in_guest(
        host,
        FORGER,
        f"set -e; echo {victim} > /run/fake-machine-id\n"
        f"mkdir -p /var/log/journal/{victim}\n"
        f"mount --bind /var/log/journal/{own} /var/log/journal/{victim}\n"
        "mount --bind /run/fake-machine-id /etc/machine-id\n"
        "systemctl restart systemd-journald\n"
        "logger -t sshd forged-machine-id-1\n"
        "journalctl --flush\n"
        # Back to its own id; the journal directory is left to go once journald has.
        "umount /etc/machine-id; systemctl restart systemd-journald\n"
        f"umount --lazy /var/log/journal/{victim}\n",
    )

    def forged() -> bool:
        argv = ["journalctl", "-m", "--no-pager", "-o", "cat", f"_MACHINE_ID={victim}"]
        return "forged-machine-id-1" in host.run(argv).stdout

    # The forgery works: journalctl -m takes the entry for the victim's...
    host.wait_for(forged, timeout=30, what="the forged entry under the victim's machine-id")
    # ...nspawnctl does not.
    assert "forged-machine-id-1" not in logs(host, VICTIM, "-n", "3000")
    assert sources_of(host, "forged-machine-id-1", "--all", "-n", "3000") == {FORGER}


def test_a_forged_machine_id_at_boot_gets_no_directory_of_the_hosts(
    host: TestHost, pair: dict[str, str]
) -> None:
    """The guest's root writes the victim's ID into its own /etc/machine-id and boots
    again, with no `apply` in between. nspawn's --link-journal would have linked the
    victim's directory on the host into it; the service binds the forger's own."""
    own, victim = pair[FORGER], pair[VICTIM]
    in_guest(host, FORGER, f"echo {victim} > /etc/machine-id")
    nspawnctl(host, "stop", FORGER)
    said = in_guest(
        host,
        FORGER,
        "cat /etc/machine-id; logger -t sshd forged-at-boot-1; journalctl --flush\n"
        f"journalctl --directory=/var/log/journal/{victim} -o cat | grep -c forged-at-boot-1",
    )
    assert said.split() == [victim, "1"]  # booted with the forged ID, kept its own journal
    victims = host.run(["journalctl", f"--directory=/var/log/journal/{victim}", "-o", "cat"])
    assert "forged-at-boot-1" not in victims.stdout
    assert "forged-at-boot-1" not in logs(host, VICTIM, "-n", "3000")
    # Its own directory on the host is still the one bound in.
    mounted = in_guest(host, FORGER, f"findmnt -n -o TARGET --target /var/log/journal/{own}")
    assert mounted.strip() == f"/var/log/journal/{own}"
    in_guest(host, FORGER, f"echo {own} > /etc/machine-id")
    nspawnctl(host, "stop", FORGER)


def test_the_hosts_journal_reads_no_guest_directory(host: TestHost, pair: dict[str, str]) -> None:
    """journalctl's default (local only) opens the host's own directory and nothing below
    a guest's, even one the guest names after the host's machine-id."""
    own, host_id = pair[FORGER], pair["host"]
    in_guest(
        host,
        FORGER,
        "logger -t sshd planted-under-host-id-1; journalctl --flush\n"
        f"mkdir -p /var/log/journal/{own}/{host_id}\n"
        f"cp /var/log/journal/{own}/system.journal /var/log/journal/{own}/{host_id}/\n",
    )
    planted = f"/var/log/journal/{own}/{host_id}"
    readable = host.run(["journalctl", "--no-pager", "-o", "cat", f"--directory={planted}"])
    assert "planted-under-host-id-1" in readable.stdout  # a sound journal file...
    argv = ["journalctl", "--no-pager", "-o", "cat", "-g", "planted-under-host-id"]
    local = host.run(argv, check=False)  # exit code 1: no entry matched
    assert "planted-under-host-id-1" not in local.stdout  # ...that the default never reads
    assert sources_of(host, "planted-under-host-id-1", "--all", "-n", "3000") == {FORGER}


HOSTILE_FILES = """
set -e
cd /var/log/journal/{own}
logger -t sshd before-the-plants-1; journalctl --flush
ln -s /var/log/journal/{host_id}/system.journal host.journal
ln -s /var/log/journal/{victim}/system.journal victim.journal
ln -s /dev/zero zero.journal
ln -s /proc/self/fd/0 stdin.journal
mkfifo fifo.journal
truncate -s 1T sparse.journal
head -c 4096 system.journal > truncated.journal
cp system.journal "$(printf 'esc\\033[2J\\033]0;t\\007\\n.journal')"
(for i in $(seq 1 300); do mkdir {own}; cd {own}; done; cp /var/log/journal/{own}/system.journal .)
ls | wc -l
"""


def test_files_planted_in_the_journal_directory(host: TestHost, pair: dict[str, str]) -> None:
    own, victim, host_id = pair[FORGER], pair[VICTIM], pair["host"]
    host.run(["logger", "-t", "hostcanary", "host-canary-2"])
    in_guest(host, VICTIM, "logger -t victimtag victim-own-2; journalctl --flush")
    host.wait_for(
        lambda: "victim-own-2" in logs(host, VICTIM, "-n", "200"),
        timeout=30,
        what="the victim's entry",
    )
    in_guest(host, FORGER, HOSTILE_FILES.format(own=own, victim=victim, host_id=host_id))
    for args in ((FORGER, "-n", "3000"), ("--all", "-n", "3000"), (FORGER,)):
        started = time.monotonic()
        run = host.run([sys.executable, "-m", "nspawnctl", "logs", *args], timeout=BOUND)
        print(f"logs {' '.join(args)} with planted files: {time.monotonic() - started:.2f} s")
        assert "\x1b" not in run.stdout + run.stderr
        assert "before-the-plants-1" in run.stdout
        # No file's contents in a message, no guest's file name either.
        assert "esc" not in run.stderr and "host-canary" not in run.stderr
    forgers = logs(host, FORGER, "-n", "3000")
    assert "host-canary-2" not in forgers and "victim-own-2" not in forgers
    assert sources_of(host, "victim-own-2", "--all", "-n", "3000") == {VICTIM}
    assert sources_of(host, "host-canary-2", "--all", "-n", "3000") == {".host"}
    assert sources_of(host, "before-the-plants-1", "--all", "-n", "3000") == {FORGER}


def _lines_of(proc: object, into: queue.Queue[str]) -> None:
    for line in proc.stdout:  # type: ignore[attr-defined]
        into.put(line)


def test_follow_attributes_new_entries_and_survives_rotation(
    host: TestHost, pair: dict[str, str]
) -> None:
    proc = host.popen(
        [sys.executable, "-m", "nspawnctl", "logs", FORGER, "-f", "-n", "0", "-o", "short-unix"],
        stdout=PIPE,
        stderr=PIPE,
    )
    seen: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines_of, args=(proc, seen), daemon=True).start()
    got: list[str] = []

    def shows(marker: str) -> bool:
        while not seen.empty():
            got.append(seen.get())
        return any(marker in line for line in got)

    try:
        # Logged until seen: follow may start reading after the first one was written.
        def logged_and_seen(marker: str) -> bool:
            in_guest(host, FORGER, f"logger -t sshd {marker}; journalctl --flush")
            return host_waits(lambda: shows(marker))

        def host_waits(predicate: object) -> bool:
            try:
                host.wait_for(predicate, timeout=5, what="a followed line")  # type: ignore[arg-type]
            except TimeoutError:
                return False
            return True

        host.wait_for(lambda: logged_and_seen("followed-1"), timeout=60, what="followed-1")
        in_guest(host, VICTIM, "logger -t sshd victim-followed-1; journalctl --flush")
        host.run(["logger", "-t", "hostcanary", "host-followed-1"])
        in_guest(host, FORGER, "journalctl --rotate; logger -t sshd after-rotation-1")
        host.wait_for(lambda: shows("after-rotation-1"), timeout=30, what="after-rotation-1")
    finally:
        _kill_inside(proc)
    text = "".join(got)
    assert "victim-followed-1" not in text and "host-followed-1" not in text
    assert "\x1b" not in text
    for line in got:
        if "followed-1" in line or "after-rotation-1" in line:
            assert line.split()[1] == FORGER, line
