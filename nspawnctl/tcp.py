"""The kernel's TCP table of the host's network namespace (/proc/net/tcp and tcp6), read
once and asked about many listen addresses: a thousand containers cost one read.

From the kernel, not from a guest, which could say anything. A connection a guest has
accepted from a socket the host passed in stays in the host's namespace, where the
socket was made, so its row is here even for a container with a private network."""

from __future__ import annotations

import ipaddress
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nspawnctl.listen import IPAddress, Listen

_ESTABLISHED = "01"
_LISTEN = "0A"


@dataclass(frozen=True)
class TcpTable:
    # (address, port) -> count; the address as the kernel has it (`::` for a wildcard).
    established: Counter[tuple[IPAddress, int]] = field(default_factory=Counter)
    # A listening socket's rx_queue is its accept queue: connections nobody took yet.
    waiting: Counter[tuple[IPAddress, int]] = field(default_factory=Counter)

    @classmethod
    def read(cls, proc_net: Path = Path("/proc/net")) -> TcpTable:
        table = cls()
        for name in ("tcp", "tcp6"):
            try:
                lines = (proc_net / name).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 5 or fields[3] not in (_ESTABLISHED, _LISTEN):
                    continue
                local = _endpoint(fields[1])
                if local is None:
                    continue
                if fields[3] == _ESTABLISHED:
                    table.established[local] += 1
                else:
                    table.waiting[local] += int(fields[4].partition(":")[2] or "0", 16)
        return table

    def connections(self, listen: Listen) -> int:
        """Open connections to `listen`: served, and waiting in its queue."""
        if listen.protocol != "tcp":
            return 0
        return sum(
            count
            for (address, port), count in self.established.items()
            if port == listen.port and (listen.address is None or _same(address, listen.address))
        )

    def waiting_on(self, listen: Listen) -> int:
        """Connections in the accept queue of the socket that binds exactly `listen`
        (None binds every address: `::`, dual-stack)."""
        if listen.protocol != "tcp":
            return 0
        return sum(
            count
            for (address, port), count in self.waiting.items()
            if port == listen.port
            and (address.is_unspecified if listen.address is None else address == listen.address)
        )


def _endpoint(text: str) -> tuple[IPAddress, int] | None:
    """The kernel's `HEXADDRESS:HEXPORT`; the address is in host byte order, 32 bits at
    a time."""
    hex_address, _sep, hex_port = text.rpartition(":")
    try:
        raw = bytes.fromhex(hex_address)
        # Each 32-bit word was printed as a number: its bytes are the wrong way round
        # on a little-endian host only.
        words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
        packed = b"".join(w[::-1] if sys.byteorder == "little" else w for w in words)
        return ipaddress.ip_address(packed), int(hex_port, 16)
    except ValueError:
        return None


def _same(address: IPAddress, wanted: IPAddress) -> bool:
    """An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d."""
    mapped = getattr(address, "ipv4_mapped", None)
    return address == wanted or (mapped is not None and mapped == wanted)
