"""Listen addresses. Host and guest socket units are both rendered from one `Listen`,
because the guest's systemd takes a passed socket only if its own unit names exactly
the same family, address and port (`2222` is `[::]:2222`, not `0.0.0.0:2222`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Listen:
    port: int
    address: IPAddress | None = None  # None: every address, both families
    protocol: str = "tcp"  # tcp or udp

    @classmethod
    def parse(cls, value: int | str, protocol: str = "tcp") -> Listen:
        if isinstance(value, int):
            return cls(_port(value), protocol=protocol)
        text = value.strip()
        if _is_number(text):
            return cls(_port_of(text), protocol=protocol)
        host, sep, port_text = text.rpartition(":")
        if not sep or not _is_number(port_text):
            raise ValueError("is not a port or ADDRESS:PORT")
        address: IPAddress
        try:
            if host.startswith("[") and host.endswith("]"):
                address = ipaddress.IPv6Address(host[1:-1])
            else:
                address = ipaddress.IPv4Address(host)
        except ipaddress.AddressValueError:
            hint = " (write IPv6 addresses in brackets: [::1]:2222)" if ":" in host else ""
            raise ValueError(f"{host!r} is not an IP address{hint}") from None
        zone = getattr(address, "scope_id", None)
        if zone:  # fe80::1%eth0: a unit file would read %e as a specifier
            raise ValueError(f"{host!r}: a zone index (%{zone}) is not supported")
        return cls(_port_of(port_text), address, protocol)

    def unit_value(self) -> str:
        """The value for ListenStream=, identical on the host and in the guest."""
        if self.address is None:
            return str(self.port)
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    @property
    def directive(self) -> str:
        """The socket unit setting that listens on it."""
        return "ListenDatagram" if self.protocol == "udp" else "ListenStream"

    def yaml_value(self) -> int | str:
        return self.port if self.address is None else self.unit_value()

    def overlaps(self, other: Listen) -> bool:
        """Whether both could not be bound at once on one host."""
        if self.port != other.port or self.protocol != other.protocol:
            return False
        if self.address is None or other.address is None:
            return True
        if self.address == other.address:
            return True
        # `::` (dual-stack) takes every address; `0.0.0.0` every IPv4 address.
        for wide, narrow in ((self.address, other.address), (other.address, self.address)):
            if wide.is_unspecified and (wide.version == 6 or narrow.version == 4):
                return True
        return False

    def __str__(self) -> str:
        return self.unit_value() + ("/udp" if self.protocol == "udp" else "")


def _is_number(text: str) -> bool:
    # ASCII only: str.isdigit() takes "²" (which int() refuses) and "٢٢" too.
    return text.isascii() and text.isdigit()


def _port_of(text: str) -> int:
    if len(text.lstrip("0")) > 5:  # out of range; and int() refuses more than 4300 digits
        return _port(0)
    return _port(int(text))


def _port(number: int) -> int:
    if not 1 <= number <= 65535:
        raise ValueError("is not a port (expected 1-65535)")
    return number
