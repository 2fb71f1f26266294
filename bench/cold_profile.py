"""Where a cold start's time goes: the first connection to a stopped container, split
into the host's part, systemd-nspawn's, the guest's systemd and sshd's, up to the SSH
banner; then, for `ssh true`, what OpenSSH does after the banner.

Every mark is a CLOCK_MONOTONIC time, which the test host, its containers and the
client share: the host's unit and the guest's manager record theirs (systemctl show
...TimestampMonotonic), the client notes its own. OpenSSH's marks are the times its
-vvv lines arrive.

Runs inside a throw-away systemd host (tests/testhost.py); needs root and the cached
image of the tests. Usage: python3 -m bench.cold_profile [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap

from bench.cold_start import stop_cold
from tests.integration.conftest import CLIENT_KEY, IMAGE_CACHE, booted_host, cached_image

NAME, PORT = "prof", 2222

# Inside the test host: one cold connection that reads the banner and stays open until
# the guest's bus answers (its sshd@ instance exists only while the connection does),
# then every mark as seconds after the connect.
BANNER = textwrap.dedent("""
    import json, socket, subprocess, sys, time
    name, port = sys.argv[1], int(sys.argv[2])
    def show(*units, props, machine=None):
        where = [f"--machine={machine}"] if machine else []
        cmd = ["systemctl", *where, "show", *units, *(f"--property={p}" for p in props)]
        deadline = time.monotonic() + 30
        while True:  # the guest's bus comes up after its sshd
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return {k: int(v) / 1e6 for k, v in (l.split("=", 1) for l in r.stdout.split())}
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        data = b""
        while b"\\n" not in data:
            data += s.recv(256)
        banner = time.monotonic()
        host = show(f"systemd-nspawn@{name}.service", props=["InactiveExitTimestampMonotonic"])
        manager = show(machine=name, props=[
            "UserspaceTimestampMonotonic", "GeneratorsStartTimestampMonotonic",
            "GeneratorsFinishTimestampMonotonic", "UnitsLoadFinishTimestampMonotonic"])
        units = subprocess.run(["systemctl", f"--machine={name}", "list-units", "--plain",
                                "--no-legend", "sshd@*.service"],
                               capture_output=True, text=True).stdout
        sshd = show(units.split()[0], machine=name, props=["InactiveExitTimestampMonotonic"])
    marks = [host["InactiveExitTimestampMonotonic"], manager["UserspaceTimestampMonotonic"],
             manager["GeneratorsStartTimestampMonotonic"],
             manager["GeneratorsFinishTimestampMonotonic"],
             manager["UnitsLoadFinishTimestampMonotonic"], sshd["InactiveExitTimestampMonotonic"],
             banner]
    print(json.dumps([m - start for m in marks]))
""")
BANNER_PHASES = (
    "connect -> host starts systemd-nspawn@",
    "systemd-nspawn sets up -> guest's systemd runs",
    "guest's systemd starts -> its generators",
    "generators",
    "loading units",
    "-> sshd@ instance started",
    "sshd@ starts -> SSH banner",
)

# Inside the test host: one cold `ssh true` with the marks of OpenSSH's -vvv lines.
COMMAND = textwrap.dedent("""
    import json, subprocess, sys, time
    port, key = sys.argv[1], sys.argv[2]
    wanted = {"Remote protocol version": "banner", "kex: algorithm:": "kex",
              "SSH2_MSG_NEWKEYS received": "keys", "Authenticated to": "auth"}
    marks, kex = {}, ""
    start = time.monotonic()
    ssh = subprocess.Popen(["ssh", "-vvv", "-p", port, "-i", key, "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "root@127.0.0.1", "true"], stderr=subprocess.PIPE, text=True)
    for line in ssh.stderr:
        for text, mark in wanted.items():
            if text in line and mark not in marks:
                marks[mark] = time.monotonic() - start
                if mark == "kex":
                    kex = line.split(":")[-1].strip()
    if ssh.wait():
        sys.exit("ssh failed")
    done = time.monotonic() - start
    print(json.dumps({"kex": kex, "marks": [marks["banner"], marks["keys"], marks["auth"], done]}))
""")
COMMAND_PHASES = (
    "connect -> SSH banner",
    "banner -> key exchange done ({kex})",
    "key exchange -> authenticated",
    "authenticated -> `true` ran, connection closed",
)


def phases(marks: list[float]) -> list[float]:
    """Milliseconds between consecutive marks, the first from 0 (the connect)."""
    return [(b - a) * 1000 for a, b in zip([0.0, *marks], marks, strict=False)]


def table(labels: tuple[str, ...], runs: list[list[float]], total: str) -> list[str]:
    lines = []
    for label, values in zip(labels, zip(*runs, strict=True), strict=True):
        lines.append(
            f"  {label:<48} {statistics.median(values):7.1f} ms"
            f"   ({min(values):6.1f} - {max(values):6.1f})"
        )
    totals = [sum(run) for run in runs]
    lines.append(
        f"  {'= ' + total:<48} {statistics.median(totals):7.1f} ms"
        f"   ({min(totals):6.1f} - {max(totals):6.1f})"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    cached_image()
    banner_runs, command_runs, kex = [], [], ""
    with booted_host(IMAGE_CACHE) as host:
        nspawnctl = [sys.executable, "-m", "nspawnctl"]
        host.run([*nspawnctl, "add", NAME, "--ssh", str(PORT), "--key", f"{CLIENT_KEY}.pub"])
        service = f"systemd-nspawn@{NAME}.service"
        for _ in range(args.runs):
            stop_cold(host, service)
            out = host.run([sys.executable, "-c", BANNER, NAME, str(PORT)]).stdout
            banner_runs.append(phases(json.loads(out)))
        for _ in range(args.runs):
            stop_cold(host, service)
            result = json.loads(
                host.run([sys.executable, "-c", COMMAND, str(PORT), CLIENT_KEY]).stdout
            )
            kex = result["kex"]
            command_runs.append(phases(result["marks"]))
    print(f"# where a cold start goes, {args.runs} runs each: median (min - max)")
    print("cold connect -> SSH banner, by marks of the host, the guest's manager and sshd@:")
    print("\n".join(table(BANNER_PHASES, banner_runs, "connect -> banner")))
    print("cold connect -> `ssh true` done, by marks of OpenSSH's client (ssh -vvv):")
    labels = tuple(label.format(kex=kex) for label in COMMAND_PHASES)
    print("\n".join(table(labels, command_runs, "connect -> `ssh true` done")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
