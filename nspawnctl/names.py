"""Names of containers and hosts."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# A machine name becomes a directory, a unit instance, a hostname and part of unit
# names; the DNS label rules keep it safe in all four (no '/', no '..', no '@').
# `\Z`, not `$`: `$` also matches before a trailing newline ("web\n").
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def check_machine_name(name: str) -> None:
    if not _LABEL.match(name):
        raise ValueError(
            "is not a valid container name "
            "(1-63 letters, digits or '-', not starting or ending with '-')"
        )


def machine_name(text: str) -> str:
    """argparse type for NAME: a bad name is a usage error before it becomes a path."""
    try:
        check_machine_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} {err}") from None
    return text


def check_hostname(hostname: str) -> None:
    if len(hostname) > 64 or not all(_LABEL.match(label) for label in hostname.split(".")):
        raise ValueError("is not a valid hostname (dot-separated labels of letters, digits, '-')")


# The host's units of a container. The socket carries a prefix of its own and the
# service is an instance of systemd's template, so a container called `ssh` or
# `nginx` can never shadow the host's ssh.service or nginx.service.
def socket_unit(name: str) -> str:
    return f"nspawnctl-{name}.socket"


def service_unit(name: str) -> str:
    return f"systemd-nspawn@{name}.service"


def lower_unit(name: str) -> str:
    """The unit that makes the ID-mapped view of the image for a user namespace. An
    instance name (with no template behind it): no container name can reach it."""
    return f"nspawnctl-lower@{name}.service"


def gate_unit(name: str) -> str:
    """The unit every boot of the container passes, which waits while nspawnctl holds
    the container stopped (hold.py). An instance name, as lower_unit's."""
    return f"nspawnctl-gate@{name}.service"


def mount_unit(path: Path) -> str:
    """The mount unit systemd expects for `path` (as `systemd-escape --path --suffix=mount`)."""
    text = "/".join(part for part in str(path).split("/") if part)
    if not text:
        return "-.mount"
    out = []
    for index, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif (
            char.isascii()
            and (char.isalnum() or char in ":_.")
            and not (index == 0 and char == ".")
        ):
            out.append(char)
        else:
            out.append("".join(f"\\x{byte:02x}" for byte in char.encode()))
    return "".join(out) + ".mount"
