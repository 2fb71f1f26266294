"""The `security:` keys: what a container's root may do on the host."""

from __future__ import annotations

from dataclasses import dataclass

# capabilities(7), as of Linux 5.9; systemd-nspawn knows the same names.
CAPABILITIES = frozenset(
    f"CAP_{name}"
    for name in [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
)


def capability_name(value: object) -> str:
    """`net_raw`, `NET_RAW` and `CAP_NET_RAW` all name CAP_NET_RAW."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a capability name")
    name = value.strip().upper()
    name = name if name.startswith("CAP_") else f"CAP_{name}"
    if name not in CAPABILITIES:
        raise ValueError(f"{value!r} is not a Linux capability (see capabilities(7))")
    return name


@dataclass(frozen=True)
class Security:
    # uid 0 of the guest is an unprivileged uid range of the host (see nspawnctl.yaml(5)).
    user_namespace: bool = True
    # Taken from the container's bounding set on top of what systemd-nspawn keeps out.
    drop_capabilities: tuple[str, ...] = ()
