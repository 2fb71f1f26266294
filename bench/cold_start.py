"""Cold start: first connection -> SSH banner, and -> a command run over SSH, for
nspawnctl's units next to the hand-written units of the classic recipe (a socket, a
service running `systemd-nspawn -jbD DIR 3`, the guest's sshd.socket), and the floor:
systemd-nspawn setting up a container that runs /bin/true.

OpenSSH 9.2's client prefers the post-quantum key exchange sntrup761x25519-sha512, whose
key generation costs the client some 100 ms of CPU here, whatever the server. The lines
"client x25519" time the same connections from a client that picks curve25519-sha256
(`ssh -o KexAlgorithms=curve25519-sha256`); every server offers both.

Runs inside a throw-away systemd host (tests/testhost.py); needs root and the cached
image of the tests. Usage: python3 -m bench.cold_start [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import (
    CLIENT_KEY,
    IMAGE_CACHE,
    STORE_IN_HOST,
    booted_host,
    cached_image,
)
from tests.testhost import TestHost

# Times one cold connection from inside the test host: connect, read the banner, then
# (for "command") run `true` over a real OpenSSH client; "command-x25519" is the same
# client choosing the classic key exchange (see the docstring).
PROBE = textwrap.dedent("""
    import socket, subprocess, sys, time
    mode, port = sys.argv[1], int(sys.argv[2])
    kex = ["-o", "KexAlgorithms=curve25519-sha256"] if mode == "command-x25519" else []
    start = time.perf_counter()
    if mode == "banner":
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            data = b""
            while b"\\n" not in data:
                chunk = s.recv(256)
                if not chunk:
                    sys.exit("connection closed before the banner")
                data += chunk
        assert data.startswith(b"SSH-2.0"), data
    else:
        subprocess.run(["ssh", *kex, "-p", str(port), "-i", sys.argv[3], "-o", "BatchMode=yes",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "LogLevel=ERROR", "root@127.0.0.1", "true"], check=True)
    print(f"{time.perf_counter() - start:.4f}")
""")

FLOOR = (
    "import subprocess, time; s = time.perf_counter(); subprocess.run(['systemd-nspawn', '-q',"
    " '--register=no', '-D', '/var/lib/machines/classic', '/bin/true'], check=True);"
    " print(f'{time.perf_counter() - s:.4f}')"
)

# The classic recipe, written by hand as in "socket-activated containers".
CLASSIC_SOCKET = "[Socket]\nListenStream=2300\n"
CLASSIC_SERVICE = "[Service]\nExecStart=/usr/bin/systemd-nspawn -jbD /var/lib/machines/classic 3\n"
CLASSIC_GUEST = {
    "etc/systemd/system/sshd.socket": "[Socket]\nListenStream=2300\nAccept=yes\n",
    "etc/systemd/system/sshd@.service": (
        "[Service]\nExecStart=-/usr/sbin/sshd -i\nStandardInput=socket\n"
        "RuntimeDirectory=sshd\nRuntimeDirectoryPreserve=yes\n"
    ),
}


def setup_classic(host: TestHost, image_rootfs: str) -> None:
    root = "/var/lib/machines/classic"
    host.run(["cp", "-a", image_rootfs, root])
    for path, text in CLASSIC_GUEST.items():
        host.write_file(f"{root}/{path}", text)
    wants = f"{root}/etc/systemd/system/sockets.target.wants"
    host.run(["mkdir", "-p", wants])
    host.run(["ln", "-s", "/etc/systemd/system/sshd.socket", f"{wants}/sshd.socket"])
    host.run(["ln", "-sf", "/dev/null", f"{root}/etc/systemd/system/ssh.service"])
    host.run(
        [
            "sh",
            "-c",
            f"systemd-id128 new > {root}/etc/machine-id && "
            f"ssh-keygen -q -A -f {root} && install -d -m 700 {root}/root/.ssh && "
            f"cp {CLIENT_KEY}.pub {root}/root/.ssh/authorized_keys",
        ]
    )
    host.write_file("/etc/systemd/system/classic.socket", CLASSIC_SOCKET)
    host.write_file("/etc/systemd/system/classic.service", CLASSIC_SERVICE)
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "start", "classic.socket"])


def stop_cold(host: TestHost, service: str) -> None:
    host.run(["systemctl", "stop", service])
    # The classic units have systemd's default start limit; reset it so the bench can
    # cycle (nspawnctl's units need no such help: StartLimitIntervalSec=0).
    host.run(["systemctl", "reset-failed", service], check=False)
    host.wait_for(
        lambda: (
            host.run(["systemctl", "is-active", service], check=False).stdout.strip()
            in ("inactive", "failed")
        ),
        timeout=60,
        what=f"{service} stopped",
    )


def cold(host: TestHost, mode: str, port: int, service: str) -> float:
    stop_cold(host, service)
    return float(host.run([sys.executable, "-c", PROBE, mode, str(port), CLIENT_KEY]).stdout)


def floor(host: TestHost) -> float:
    stop_cold(host, "classic.service")  # its tree is the floor's
    return float(host.run([sys.executable, "-c", FLOOR]).stdout)


def row(label: str, times: list[float]) -> str:
    return (
        f"{label:<44} median {statistics.median(times) * 1000:7.1f} ms   "
        f"min {min(times) * 1000:7.1f} ms   max {max(times) * 1000:7.1f} ms"
    )


# The plain alternative for warm connections: the host's own sshd, one per
# connection from a socket, as in the guest.
HOST_SSHD = {
    "/etc/systemd/system/hostsshd.socket": "[Socket]\nListenStream=2399\nAccept=yes\n",
    "/etc/systemd/system/hostsshd@.service": (
        "[Service]\nExecStart=-/usr/sbin/sshd -i\nStandardInput=socket\n"
        "RuntimeDirectory=sshd\nRuntimeDirectoryPreserve=yes\n"
    ),
}


def warm(host: TestHost, mode: str, port: int, runs: int) -> list[float]:
    probe = [sys.executable, "-c", PROBE, mode, str(port), CLIENT_KEY]
    host.run(probe)  # boots it if needed; not counted
    return [float(host.run(probe).stdout) for _ in range(runs)]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    image = cached_image()
    rootfs = f"{STORE_IN_HOST}/{image.key}/{image.current.name}"
    with booted_host(IMAGE_CACHE) as host:
        host.run(
            [
                sys.executable,
                "-m",
                "nspawnctl",
                "add",
                "bench",
                "--ssh",
                "2222",
                "--key",
                f"{CLIENT_KEY}.pub",
            ]
        )
        # The same without a user namespace (security.user_namespace: false): what the
        # ID-mapped image and PrivateUsers= cost.
        host.write_file(
            "/var/tmp/bench-rootns.yaml",
            f"image: debian:bookworm\nssh: {{listen: 2223, authorized_keys: [{CLIENT_KEY}.pub]}}\n"
            "security: {user_namespace: false}\n",
        )
        nspawnctl = [sys.executable, "-m", "nspawnctl"]
        host.run([*nspawnctl, "add", "rootns", "-f", "/var/tmp/bench-rootns.yaml"])
        setup_classic(host, rootfs)
        service = "systemd-nspawn@bench.service"
        rootns = "systemd-nspawn@rootns.service"
        classic = "classic.service"
        probes: dict[str, Callable[[], float]] = {
            "cold banner, nspawnctl": lambda: cold(host, "banner", 2222, service),
            "cold banner, nspawnctl, no user namespace": lambda: cold(host, "banner", 2223, rootns),
            "cold banner, classic hand-written units": lambda: cold(host, "banner", 2300, classic),
            "floor: systemd-nspawn /bin/true": lambda: floor(host),
            "cold command (ssh true), nspawnctl": lambda: cold(host, "command", 2222, service),
            "cold command, nspawnctl, client x25519": lambda: cold(
                host, "command-x25519", 2222, service
            ),
            "cold command (ssh true), nspawnctl, no userns": lambda: cold(
                host, "command", 2223, rootns
            ),
            "cold command (ssh true), classic units": lambda: cold(host, "command", 2300, classic),
        }
        # Round-robin, so that a noisy minute on the machine weighs on every variant alike.
        cold_times: dict[str, list[float]] = {label: [] for label in probes}
        for _ in range(args.runs):
            for label, probe in probes.items():
                cold_times[label].append(probe())
        results = list(cold_times.items())
        stop_cold(host, rootns)
        stop_cold(host, classic)
        results.append(("warm banner, nspawnctl", warm(host, "banner", 2222, args.runs)))
        results.append(("warm command, nspawnctl", warm(host, "command", 2222, args.runs)))
        results.append(
            (
                "warm command, nspawnctl, client x25519",
                warm(host, "command-x25519", 2222, args.runs),
            )
        )
        if Path("/usr/sbin/sshd").exists():
            for path, text in HOST_SSHD.items():
                host.write_file(path, text)
            host.run(
                [
                    "sh",
                    "-c",
                    f"cp {CLIENT_KEY}.pub /root/.ssh/authorized_keys && "
                    "systemctl daemon-reload && systemctl start hostsshd.socket",
                ]
            )
            results.append(
                ("warm banner, the host's own sshd -i", warm(host, "banner", 2399, args.runs))
            )
            results.append(
                ("warm command, the host's own sshd -i", warm(host, "command", 2399, args.runs))
            )
            results.append(
                (
                    "warm command, host's sshd -i, client x25519",
                    warm(host, "command-x25519", 2399, args.runs),
                )
            )
        else:
            print(
                "(no /usr/sbin/sshd on this machine: apt-get install openssh-server for the "
                "warm baseline)"
            )
    print(
        f"# cold and warm start, {args.runs} runs each, nested in a throw-away systemd host "
        f"({Path('/proc/cpuinfo').read_text().count('processor')} CPUs)"
    )
    for label, times in results:
        print(row(label, times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
