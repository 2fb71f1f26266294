"""Per-container metrics: gathered once for every container, shown as the Prometheus
text format (`nspawnctl metrics`, and over HTTP by a socket-activated unit) and as a
live table (`nspawnctl top`).

Every figure comes from the host: systemd's unit states (one call for all), the
kernel's TCP table (one read for all), the kernel's control-group files, and the events
the container's own unit records (events.py). Nothing is read from a guest's tree."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.atomic import write_atomic
from nspawnctl.bus import Systemd, UnitState
from nspawnctl.cgroup import Usage, usage
from nspawnctl.conflicts import host_listeners
from nspawnctl.container import container_state, load_all
from nspawnctl.disk import Use
from nspawnctl.disk import use as disk_use
from nspawnctl.errors import ConfigError, UsageError
from nspawnctl.events import BOOT_BUCKETS, Counts, read_counts
from nspawnctl.install import Undo, remove_file, restore_file
from nspawnctl.layers import Layer
from nspawnctl.listen import Listen
from nspawnctl.log import log
from nspawnctl.names import service_unit, socket_unit
from nspawnctl.paths import Paths
from nspawnctl.render import render_metrics_units
from nspawnctl.tcp import TcpTable

# The endpoint's own units (host-wide, not a container's).
METRICS_SOCKET = "nspawnctl-metrics.socket"
METRICS_SERVICE = "nspawnctl-metrics@.service"
DEFAULT_LISTEN = "127.0.0.1:9847"
STATES = ("stopped", "booting", "running", "stopping", "failed")


@dataclass(frozen=True)
class Sample:
    name: str
    state: str  # one of STATES
    socket_failed: bool
    connections: int  # open to its listen addresses: served and waiting
    waiting: int  # in the host's queue, taken by nobody yet
    counts: Counts | None  # None: not readable by this user
    usage: Usage
    disk: Use | None = None  # its own disk (resources.disk), as the guest's df sees it


def collect(paths: Paths, *, fold: bool = True) -> tuple[list[Sample], list[ConfigError]]:
    """A sample of every container whose YAML reads; the YAML that does not, as errors."""
    configs, errors = load_all(paths)
    with Systemd.connect() as systemd:
        # Only what systemd has loaded: a stopped container's units may be unloaded.
        loaded = systemd.loaded_states([socket_unit("*"), service_unit("*")])
    tcp = TcpTable.read()
    stopped = UnitState("", "loaded", "inactive", "dead")
    samples = []
    for config in configs:
        name = config.name
        service = loaded.get(service_unit(name), stopped)
        socket = loaded.get(socket_unit(name), stopped)
        state = container_state(service)
        listens = [listen for _key, listen in config.listens()]
        samples.append(
            Sample(
                name=name,
                state=state if state in STATES else "stopped",
                socket_failed=socket.active == "failed",
                connections=sum(tcp.connections(listen) for listen in listens),
                waiting=sum(tcp.waiting_on(listen) for listen in listens),
                counts=read_counts(paths, name, fold=fold),
                usage=usage(name) if state != "stopped" else Usage(),
                disk=disk_use(Layer.of(paths, name).path) if config.resources.disk else None,
            )
        )
    return samples, errors


# --- the Prometheus text format (version 0.0.4) -----------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


# Every metric: its type and help, one row each (the man page lists the same names).
FAMILIES: dict[str, tuple[str, str]] = {
    "nspawnctl_containers": ("gauge", "Containers defined (YAML that reads)."),
    "nspawnctl_config_errors": ("gauge", "YAML files that do not read."),
    "nspawnctl_container_state": ("gauge", "1 for the container's state, 0 for the others."),
    "nspawnctl_container_socket_failed": (
        "gauge",
        "1 if systemd gave up on the container's socket: it no longer listens.",
    ),
    "nspawnctl_container_connections": (
        "gauge",
        "Open TCP connections to the container's addresses, served or waiting.",
    ),
    "nspawnctl_container_connections_waiting": (
        "gauge",
        "Connections in the host's queue that nothing has taken yet.",
    ),
    "nspawnctl_container_cold_starts_total": (
        "counter",
        "Boots begun: by a connection, or by hand.",
    ),
    "nspawnctl_container_boot_seconds": ("histogram", "Seconds from a boot's start to ready."),
    "nspawnctl_container_idle_poweroffs_total": (
        "counter",
        "Power-offs the guest made itself: its idle check (idle_timeout), or its root.",
    ),
    "nspawnctl_container_reboots_total": ("counter", "Reboots the guest made itself."),
    "nspawnctl_container_failures_total": (
        "counter",
        "Times the container's unit ended failed: a boot that did not come up, a crash.",
    ),
    "nspawnctl_container_disk_bytes": ("gauge", "Bytes used on its own disk (resources.disk)."),
    "nspawnctl_container_disk_limit_bytes": ("gauge", "Size of its own disk."),
    "nspawnctl_container_disk_inodes": ("gauge", "Files (inodes) on its own disk."),
    "nspawnctl_container_disk_inodes_limit": ("gauge", "Files its own disk can hold."),
    "nspawnctl_container_memory_bytes": ("gauge", "Memory in use."),
    "nspawnctl_container_memory_limit_bytes": ("gauge", "Memory limit (resources.memory)."),
    "nspawnctl_container_cpu_seconds_total": ("counter", "CPU time used, this boot."),
    "nspawnctl_container_tasks": ("gauge", "Processes and threads."),
    "nspawnctl_container_io_read_bytes_total": (
        "counter",
        "Bytes read from block devices, this boot.",
    ),
    "nspawnctl_container_io_written_bytes_total": (
        "counter",
        "Bytes written to block devices, this boot.",
    ),
}


class _Lines:
    """Samples by family, each family's HELP and TYPE written once, before its samples."""

    def __init__(self) -> None:
        self._samples: dict[str, list[str]] = {name: [] for name in FAMILIES}

    def add(self, name: str, labels: str, value: float | None, suffix: str = "") -> None:
        """A sample of family `name`; None (not counted on this host) adds none."""
        if value is not None:
            braces = f"{{{labels}}}" if labels else ""
            self._samples[name].append(f"{name}{suffix}{braces} {_number(value)}")

    def text(self) -> str:
        out = []
        for name, (kind, help_text) in FAMILIES.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *self._samples[name]]
        return "\n".join(out) + "\n"


def _counts(out: _Lines, c: str, counts: Counts) -> None:
    out.add("nspawnctl_container_cold_starts_total", c, counts.starts)
    boot, cumulative = "nspawnctl_container_boot_seconds", 0
    for bound, count in zip((*BOOT_BUCKETS, None), counts.boot_buckets, strict=True):
        cumulative += count
        le = "+Inf" if bound is None else repr(bound)
        out.add(boot, f'{c},le="{le}"', cumulative, "_bucket")
    out.add(boot, c, counts.boot_seconds_sum, "_sum")
    out.add(boot, c, counts.boots, "_count")
    out.add("nspawnctl_container_idle_poweroffs_total", c, counts.guest_poweroffs)
    out.add("nspawnctl_container_reboots_total", c, counts.reboots)
    out.add("nspawnctl_container_failures_total", c, counts.failures)


def exposition(samples: Sequence[Sample], config_errors: int) -> str:
    """The Prometheus text format of `samples`."""
    out = _Lines()
    out.add("nspawnctl_containers", "", len(samples))
    out.add("nspawnctl_config_errors", "", config_errors)
    for s in samples:
        c = f'container="{_label(s.name)}"'
        for state in STATES:
            out.add("nspawnctl_container_state", f'{c},state="{state}"', int(s.state == state))
        out.add("nspawnctl_container_socket_failed", c, int(s.socket_failed))
        out.add("nspawnctl_container_connections", c, s.connections)
        out.add("nspawnctl_container_connections_waiting", c, s.waiting)
        if s.counts is not None:
            _counts(out, c, s.counts)
        if s.disk is not None:
            out.add("nspawnctl_container_disk_bytes", c, s.disk.bytes_used)
            out.add("nspawnctl_container_disk_limit_bytes", c, s.disk.bytes_total)
            out.add("nspawnctl_container_disk_inodes", c, s.disk.inodes_used)
            out.add("nspawnctl_container_disk_inodes_limit", c, s.disk.inodes_total)
        u = s.usage
        out.add("nspawnctl_container_memory_bytes", c, u.memory_bytes)
        out.add("nspawnctl_container_memory_limit_bytes", c, u.memory_limit_bytes)
        out.add("nspawnctl_container_cpu_seconds_total", c, u.cpu_seconds)
        out.add("nspawnctl_container_tasks", c, u.tasks)
        out.add("nspawnctl_container_io_read_bytes_total", c, u.io_read_bytes)
        out.add("nspawnctl_container_io_written_bytes_total", c, u.io_written_bytes)
    return out.text()


# --- the HTTP endpoint's units ---------------------------------------------------------------


def unit_files(paths: Paths) -> tuple[Path, Path]:
    return paths.unit_dir / METRICS_SOCKET, paths.unit_dir / METRICS_SERVICE


def enable(paths: Paths, listen: Listen) -> None:
    """Write and start the endpoint's socket; a second call moves it to `listen`."""
    configs, _errors = load_all(paths)
    for config in configs:
        for key, own in config.listens():
            if own.overlaps(listen):
                raise UsageError(
                    f"{listen.unit_value()}: container {config.name} listens there ({key})",
                    hint="give the endpoint another address: --listen ADDRESS:PORT",
                )
    socket_file, _service_file = unit_files(paths)
    ours = socket_file.exists()
    # Where the endpoint listens already, its own socket is the holder (systemd's).
    current = (
        f"\nListenStream={listen.unit_value()}\n" in socket_file.read_text() if ours else False
    )
    for holder in host_listeners():
        if holder.listen.overlaps(listen) and not (current and holder.holder.startswith("systemd")):
            raise UsageError(
                f"{listen.unit_value()}: {holder.holder} listens there",
                hint="give the endpoint another address: --listen ADDRESS:PORT",
            )
    with Systemd.connect() as systemd, Undo().guard() as undo:
        for file in render_metrics_units(paths, listen):
            path = Path(file.path)
            previous = path.read_text() if path.exists() else None
            write_atomic(path, file.text, file.mode)
            undo.push(f"writing {path}", functools.partial(restore_file, path, previous))
        systemd.reload()
        undo.push("reload", systemd.reload)
        if ours:
            systemd.stop(METRICS_SOCKET)  # listening on the old address
        systemd.enable([METRICS_SOCKET])
        systemd.start(METRICS_SOCKET)


def disable(paths: Paths) -> None:
    with Systemd.connect() as systemd:
        if any(path.exists() for path in unit_files(paths)):
            systemd.stop(METRICS_SOCKET)
            systemd.disable([METRICS_SOCKET])
        for path in unit_files(paths):
            remove_file(path)
        systemd.reload()
    log.info("the metrics endpoint is off")


def is_enabled(paths: Paths) -> bool:
    return unit_files(paths)[0].exists()
