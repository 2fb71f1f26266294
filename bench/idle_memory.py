"""Scale to zero: the processes and memory of an idle container before and after its
idle power-off (after: none), next to the same container without `idle_timeout`,
which stays up.

Memory is the cgroup's own count (MemoryCurrent=) where the host accounts memory;
where it does not (the throw-away test host: TESTING.md), the sum of the proportional
set size (Pss, /proc/PID/smaps_rollup) of the unit's processes, which counts a page
shared by N processes as 1/N to each of them (the other container's too: both map the
same image files). The script says which it used.

Runs inside a throw-away systemd host (tests/testhost.py); needs root and the cached
image of the tests. Usage: python3 -m bench.idle_memory [--idle SECONDS]
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from dataclasses import dataclass

from tests.integration.conftest import CLIENT_KEY, IMAGE_CACHE, booted_host, cached_image, ssh
from tests.testhost import TestHost

# Run inside the test host: every process of a unit (its cgroup, all hierarchies
# tried, since hosts differ) with its Pss, and the unit's MemoryCurrent.
PROBE = textwrap.dedent("""
    import json, os, subprocess, sys
    unit = sys.argv[1]
    def show(prop):
        return subprocess.run(["systemctl", "show", "-P", prop, unit],
                              capture_output=True, text=True).stdout.strip()
    cgroup = show("ControlGroup")
    pids = set()
    for top in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"):
        for dirpath, _dirs, files in os.walk(top + cgroup if cgroup else "/nonexistent"):
            if "cgroup.procs" in files:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids.update(int(p) for p in f.read().split())
        if pids:
            break
    pss, names = 0, []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/comm") as f:
                names.append(f.read().strip())
            with open(f"/proc/{pid}/smaps_rollup") as f:
                pss += sum(int(l.split()[1]) for l in f if l.startswith("Pss:")) * 1024
        except OSError:  # gone meanwhile
            pass
    current = show("MemoryCurrent")
    print(json.dumps({
        "state": show("ActiveState"),
        "processes": len(pids),
        "names": names,
        "pss": pss,
        "memory_current": int(current) if current.isdigit() else None,
    }))
""")


@dataclass(frozen=True)
class Sample:
    state: str
    processes: int
    names: list[str]  # the processes' names (comm)
    pss: int  # bytes
    memory_current: int | None  # bytes; None where the host does not account memory

    def memory(self) -> tuple[int, str]:
        if self.memory_current is not None:
            return self.memory_current, "cgroup MemoryCurrent"
        return self.pss, "sum of Pss"


def sample(host: TestHost, name: str) -> Sample:
    out = host.run([sys.executable, "-c", PROBE, f"systemd-nspawn@{name}.service"]).stdout
    return Sample(**json.loads(out))


def add(host: TestHost, name: str, port: int, idle: int | None) -> None:
    text = f"ssh: {{listen: {port}, authorized_keys: [{CLIENT_KEY}.pub]}}\n"
    if idle is not None:
        text += f"idle_timeout: {idle}s\n"
    host.write_file(f"/etc/nspawnctl/{name}.yaml", text)
    host.run([sys.executable, "-m", "nspawnctl", "add", name])


def running(host: TestHost, name: str) -> bool:
    out = host.run(["machinectl", "show", "--property=Leader", "--value", name], check=False)
    return bool(out.stdout.strip())


def row(label: str, s: Sample) -> str:
    memory, _how = s.memory()
    return f"{label:<52} {s.state:<10} {s.processes:4d} processes  {memory / 2**20:7.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--idle", type=int, default=10, help="idle_timeout in seconds")
    args = parser.parse_args()
    cached_image()
    with booted_host(IMAGE_CACHE) as host:
        add(host, "sleepy", 2701, args.idle)
        add(host, "awake", 2702, None)
        # The same work for both: a cold boot by an SSH session that then ends.
        for port in (2701, 2702):
            ssh(host, port, "true")
        ended = time.monotonic()
        for name in ("sleepy", "awake"):  # idle means booted, with nothing to do
            host.run(["systemctl", f"--machine={name}", "is-system-running", "--wait"], check=False)
        before, baseline = sample(host, "sleepy"), sample(host, "awake")
        host.wait_for(
            lambda: not running(host, "sleepy"),
            timeout=args.idle + 60,
            what="sleepy powered off for being idle",
        )
        off = time.monotonic() - ended
        # The power-off is seen once machined drops the machine; the unit's last
        # processes may still be exiting then.
        host.wait_for(
            lambda: sample(host, "sleepy").processes == 0,
            timeout=30,
            what="sleepy's last process gone",
        )
        after, baseline_after = sample(host, "sleepy"), sample(host, "awake")
        socket = host.run(["systemctl", "show", "-P", "SubState", "nspawnctl-sleepy.socket"])
    _memory, how = before.memory()
    print(
        f"# idle container before and after its idle power-off (idle_timeout {args.idle} s), "
        "nested in a throw-away systemd host"
    )
    print(f"# memory: {how} of the unit's processes (systemd-nspawn and the whole guest)")
    print(row("idle_timeout: idle, before its power-off", before))
    print(row(f"idle_timeout: after its power-off ({off:.1f} s idle)", after))
    print(f"{'':<52} socket nspawnctl-sleepy.socket: {socket.stdout.strip()}")
    print(row("no idle_timeout (baseline): idle, same moment", baseline))
    print(row("no idle_timeout (baseline): idle, still running", baseline_after))
    print(f"processes of an idle container: {', '.join(baseline_after.names)}")
    return 0 if after.processes == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
