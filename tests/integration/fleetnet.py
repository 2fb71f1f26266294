"""Several throw-away hosts on one private network: a bridge in the client host's
network namespace, and a veth pair from it to each server host. Each host keeps its own
namespace (--private-network), so nothing of this reaches this machine's network."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

from tests.integration.conftest import CLIENT_KEY, booted_host, ssh_argv
from tests.testhost import DEFAULT_MASK, TestHost, sh

SUBNET = "10.231.0"
BRIDGE = "fleet0"
# Not on any network: connecting to it fails at once (no route), as to a host that is down.
DOWN = f"{SUBNET}.99"


@dataclass(frozen=True)
class Fleet:
    client: TestHost  # runs nspawnctl -H; holds the bridge
    servers: tuple[TestHost, ...]  # run sshd and nspawnctl, with containers

    def address(self, server: int) -> str:
        return f"{SUBNET}.{server + 2}"


def _wire(client: TestHost, server: TestHost, address: str) -> None:
    tag = secrets.token_hex(3)
    outer, inner = f"fl{tag}c", f"fl{tag}s"  # made here, then moved into the two hosts
    sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
    sh("ip", "link", "set", outer, "netns", str(client.leader))
    sh("ip", "link", "set", inner, "netns", str(server.leader))
    client.run(["ip", "link", "set", outer, "master", BRIDGE, "up"])
    server.run(["ip", "link", "set", inner, "name", "eth0"])
    server.run(["ip", "address", "add", f"{address}/24", "dev", "eth0"])
    server.run(["ip", "link", "set", "eth0", "up"])


def _serve_ssh(server: TestHost, keys: str) -> None:
    """sshd as on any host, root logging in with the client's and the servers' keys
    (migrate goes from server to server), and nspawnctl on the PATH an ssh session gets
    (it runs from this checkout, as the tests' nspawnctl does)."""
    server.write_file("/root/.ssh/authorized_keys", keys, 0o600)
    server.write_file("/root/.ssh/config", "StrictHostKeyChecking accept-new\n", 0o600)
    server.write_file(
        "/usr/local/sbin/nspawnctl", f'#!/bin/sh\nexec {sys.executable} -m nspawnctl "$@"\n', 0o755
    )
    server.run(["systemctl", "start", "ssh.service"])


def _server_mask() -> tuple[str, ...]:
    """Servers are hosts as every test's, but with sshd not masked."""
    return tuple(u for u in DEFAULT_MASK if not u.startswith("ssh."))


def _join(f: Fleet, server: TestHost, index: int) -> None:
    """`server` on the fleet's network at f.address(index), serving ssh to the client
    and to every other server."""
    keys = "".join(h.run(["cat", f"{CLIENT_KEY}.pub"]).stdout for h in (f.client, *f.servers))
    address = f.address(index)
    _wire(f.client, server, address)
    _serve_ssh(server, keys)
    f.client.wait_for(
        lambda: (
            f.client.run(
                ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", address, "true"],
                check=False,
            ).returncode
            == 0
        ),
        timeout=60,
        what=f"sshd on {address}",
        interval=0.2,
    )


@contextmanager
def fleet(images: Path, servers: int = 2) -> Iterator[Fleet]:
    with ExitStack() as stack:
        mask = _server_mask()
        hosts = [stack.enter_context(booted_host(images, mask=mask)) for _ in range(servers)]
        client = stack.enter_context(TestHost())
        client.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", CLIENT_KEY])
        # The user's own ssh config: a new host's key is learnt on first use.
        client.write_file("/root/.ssh/config", "StrictHostKeyChecking accept-new\n", 0o600)
        client.run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        client.run(["ip", "address", "add", f"{SUBNET}.1/24", "dev", BRIDGE])
        client.run(["ip", "link", "set", BRIDGE, "up"])
        built = Fleet(client, tuple(hosts))
        for index, server in enumerate(hosts):
            _join(built, server, index)
        yield built


@contextmanager
def newcomer(f: Fleet, images: Path) -> Iterator[tuple[TestHost, str]]:
    """One more server, on the fleet's network but not one of f.servers, with image
    store `images` (an empty one: a host that has no image yet); and its address. The
    client and the servers log in to it; it logs in to none of them."""
    with booted_host(images, mask=_server_mask()) as server:
        index = len(f.servers)
        _join(f, server, index)
        yield server, f.address(index)


def on_client(
    f: Fleet, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> CompletedProcess[str]:
    """nspawnctl run on the client host, as a user runs it there."""
    return f.client.run([sys.executable, "-m", "nspawnctl", *args], check=check, env=env)


def far_ssh(f: Fleet, server: int, port: str, command: str) -> str:
    """A real ssh client on the client host, to a container's port on a server."""
    argv = ssh_argv(int(port), command)
    argv[-2] = f"root@{f.address(server)}"
    return f.client.run(argv, timeout=120).stdout
