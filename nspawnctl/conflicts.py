"""Addresses two parties want: another container's, or what already listens on the host.
`add` and `apply` refuse them before they write anything."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

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
