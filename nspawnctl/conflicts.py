"""Addresses two parties want: another container's, or what already listens on the host.
`add` and `apply` refuse them before they write anything."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.config import ContainerConfig
from nspawnctl.errors import ConfigError
from nspawnctl.listen import Listen
from nspawnctl.run import run

_USERS = re.compile(r'\("([^"]+)",pid=(\d+)')


@dataclass(frozen=True)
class Listener:
    listen: Listen
    holder: str  # "nginx (pid 812)"


def host_listeners() -> list[Listener]:
    """Every listening TCP and bound UDP socket of the host's network namespace."""
    found = []
    for protocol, flag in (("tcp", "-t"), ("udp", "-u")):
        out = run(["ss", "-H", "-l", "-n", "-p", flag], check=False).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 5:
                continue
            listen = _parse(fields[3], protocol)
            if listen is None:
                continue
            users = _USERS.findall(line)
            holder = ", ".join(f"{comm} (pid {pid})" for comm, pid in users) or "the kernel"
            if users and users[0][1] == "1":
                holder = "systemd (a socket unit of the host)"
            found.append(Listener(listen, holder))
    return found


def _parse(local: str, protocol: str) -> Listen | None:
    host, _sep, port = local.rpartition(":")
    if not port.isdigit():
        return None
    host = host.split("%")[0].strip("[]")
    if host in ("*", ""):
        return Listen(int(port), None, protocol)
    try:
        return Listen(int(port), ipaddress.ip_address(host), protocol)
    except ValueError:
        return None


_LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp


def waiting_connections(listen: Listen, proc_net: Path = Path("/proc/net")) -> int:
    """Connections the kernel has accepted for a host socket that nobody has taken off
    its queue yet: for a running container, ones its guest does not serve (its own
    socket unit stopped or failed). From the kernel's table (a listening socket's
    rx_queue is its accept queue), not from the guest, which could say anything."""
    if listen.protocol != "tcp":
        return 0
    waiting = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc_net / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 5 or fields[3] != _LISTEN_STATE:
                continue
            address, _sep, port = fields[1].rpartition(":")
            if int(port, 16) != listen.port or not _same_address(address, listen):
                continue
            waiting += int(fields[4].partition(":")[2], 16)
    return waiting


def _same_address(hex_address: str, listen: Listen) -> bool:
    """Whether the kernel's hex address (in host byte order, 32 bits at a time) is the
    one `listen` binds; None binds every address (`::`, dual-stack)."""
    raw = bytes.fromhex(hex_address)
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(packed)
    if listen.address is None:
        return address.is_unspecified
    return address == listen.address


def check_host_ports(config: ContainerConfig, listeners: list[Listener]) -> None:
    """Refuse a listen address something on the host already holds."""
    for key, listen in config.listens():
        for listener in listeners:
            if listen.overlaps(listener.listen):
                raise ConfigError(
                    config.source,
                    key,
                    f"port {listen.port}/{listen.protocol} is already in use on the host by "
                    f"{listener.holder} ({listener.listen})",
                    hint="choose another port, or stop what holds it",
                )


def check_conflicts(config: ContainerConfig, others: Sequence[ContainerConfig]) -> None:
    """Refuse a listen address or a static address that another container already uses."""
    for other in others:
        if (
            other.name != config.name
            and config.network.address
            and (config.network.address.ip == (other.network.address and other.network.address.ip))
        ):
            raise ConfigError(
                config.source,
                "network.address",
                f"{config.network.address.ip} is already the address of container "
                f"'{other.name}' ({other.source})",
                hint="choose another address",
            )
    for key, listen in config.listens():
        for other in others:
            if other.name == config.name:
                continue
            for other_key, other_listen in other.listens():
                if listen.overlaps(other_listen):
                    raise ConfigError(
                        config.source,
                        key,
                        f"port {listen.port} is already used by container '{other.name}' "
                        f"({other.source}: {other_key}: {other_listen})",
                        hint="choose another port, or a different address for each",
                    )
