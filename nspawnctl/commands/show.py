"""list and status."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from nspawnctl.bus import Systemd, UnitState, text
from nspawnctl.commands import add_name, add_verbs
from nspawnctl.config import ContainerConfig, load_config
from nspawnctl.container import container_state, load_all, require_installed, units_of
from nspawnctl.disk import use as disk_use
from nspawnctl.errors import ConfigError, Exit
from nspawnctl.guesttree import disk_usage
from nspawnctl.layers import Layer, mounted_lower
from nspawnctl.listen import Listen
from nspawnctl.log import log
from nspawnctl.names import service_unit, socket_unit
from nspawnctl.paths import Paths
from nspawnctl.resources import KEYS as RESOURCE_KEYS
from nspawnctl.screen import shown
from nspawnctl.store import ImageStore
from nspawnctl.tcp import TcpTable
from nspawnctl.userns import RANGE, base_of

_UNSET = 2**64 - 1  # systemd's "no value" for counters such as MemoryCurrent
_SETTLE_SECONDS = 0.5  # how long a connection on its way in may sit in the queue


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parsers = add_verbs(
        sub,
        {
            "list": ("one row per container", run_list),
            "status": (
                "socket, container, machine, addresses, memory and uptime of a container",
                run_status,
            ),
        },
    )
    add_name(parsers["status"])
    for p in parsers.values():
        p.add_argument("--json", action="store_true", help="print JSON")


def _socket_state(state: UnitState) -> str:
    return state.sub if state.active == "active" else str(state)


def _container_state(state: UnitState) -> str:
    return container_state(state) if state.load == "loaded" else "-"


def _unloaded(paths: Paths, name: str, unit: str) -> UnitState:
    """A unit systemd has not loaded: an installed container's, which systemd dropped
    from memory while it was inactive, or one that does not exist."""
    installed = (paths.unit_dir / socket_unit(name)).exists()
    return (
        UnitState(unit, "loaded", "inactive", "dead")
        if installed
        else UnitState(unit, "not-found", "inactive", "dead")
    )


def run_list(args: argparse.Namespace, paths: Paths) -> int:
    configs, errors = load_all(paths)
    for err in errors:
        log.warning("%s", err.message)
    with Systemd.connect() as systemd:
        loaded = systemd.loaded_states([socket_unit("*"), service_unit("*")])
    states = {
        unit: loaded.get(unit) or _unloaded(paths, c.name, unit)
        for c in configs
        for unit in (socket_unit(c.name), service_unit(c.name))
    }
    rows: list[dict[str, Any]] = [
        {
            "name": c.name,
            "socket": _socket_state(states[socket_unit(c.name)]),
            "container": _container_state(states[service_unit(c.name)]),
            "listen": [str(listen) for _key, listen in c.listens()],
            "address": str(c.network.address.ip) if c.network.address else None,
            "image": c.image.image,
        }
        for c in configs
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return Exit.FAILED if errors else Exit.OK
    table = [["NAME", "SOCKET", "CONTAINER", "LISTEN", "ADDRESS", "IMAGE"]]
    table += [
        [
            str(r["name"]),
            str(r["socket"]),
            str(r["container"]),
            ",".join(r["listen"]),
            str(r["address"] or "-"),
            str(r["image"]),
        ]
        for r in rows
    ]
    # Shown as text: what systemd or a guest says must not act on the terminal.
    table = [[shown(cell) for cell in row] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return Exit.FAILED if errors else Exit.OK


def _stuck(listens: list[Listen]) -> dict[str, int]:
    """Connections in the host's queue that nothing takes. One on its way in sits there
    for a moment, so only what is still queued a moment later counts."""
    waiting = {str(listen): TcpTable.read().waiting_on(listen) for listen in listens}
    if any(waiting.values()):
        time.sleep(_SETTLE_SECONDS)
        later = TcpTable.read()
        waiting = {
            str(listen): min(waiting[str(listen)], later.waiting_on(listen)) for listen in listens
        }
    return waiting


def status(paths: Paths, name: str) -> dict[str, Any]:
    config = None
    try:
        config = load_config(name, paths.config_file(name))
    except ConfigError as err:
        log.warning("%s", err.message)
    socket, service = socket_unit(name), service_unit(name)
    with Systemd.connect() as systemd:
        states = systemd.states(units_of(paths, name))
        machine = systemd.machine(name)
        running = states[service].active == "active"
        memory = systemd.unit_property(service, "MemoryCurrent", "t") if running else _UNSET
        since = systemd.unit_property(service, "ActiveEnterTimestamp", "t") if running else 0
        enabled = systemd.unit_file_state(socket)
        # Frozen for a copy (`snapshot --force`): its connections wait by design.
        freezer = systemd.freezer_state(service) if running else "running"
        # What systemd holds for the unit, which is what the kernel enforces.
        limits = {
            key: systemd.unit_property(service, spec.bus_name, "t")
            for key, spec in RESOURCE_KEYS.items()
            if spec.bus_name is not None
        }
        # Units systemd gave up on, with why: a failed socket no longer listens.
        failed = {
            unit: text(systemd.unit_property(unit, "Result", "s"))
            for unit, state in states.items()
            if state.active == "failed"
        }
    listens = [listen for _key, listen in config.listens()] if config else []
    waiting = _stuck(listens)
    return {
        "name": name,
        "config": str(paths.config_file(name)),
        "image": config.image.image if config else None,
        "listen": [str(listen) for _key, listen in config.listens()] if config else [],
        # Connections in the host's queue that nothing has taken yet (see run_status).
        "waiting": waiting,
        "freezer": freezer,
        "network": str(config.network) if config else None,
        "address": str(config.network.address) if config and config.network.address else None,
        "socket": {"unit": socket, "state": _socket_state(states[socket]), "enabled": enabled},
        "failed": failed,
        "container": {"unit": service, "state": _container_state(states[service])},
        "machine": {"leader": machine.leader, "state": machine.state} if machine else None,
        "memory_bytes": None if memory == _UNSET else int(memory),
        "limits": {key: int(value) for key, value in limits.items() if value != _UNSET},
        "uptime_seconds": round(time.time() - since / 1e6, 1) if since else None,
        "tree": str(paths.machine_dir(name)),
        **_layer_info(paths, name, config),
    }


def _layer_info(paths: Paths, name: str, config: ContainerConfig | None) -> dict[str, Any]:
    layer = Layer.of(paths, name)
    mounted = mounted_lower(paths.machine_dir(name))
    image = ImageStore(paths.image_dir).find(config.image) if config else None
    current = image.current if image else None
    version = mounted or current
    # The guest's uid range on the host, kept as the owner of its layer (0: none).
    base = base_of(layer.upper) if layer.upper.exists() else 0
    own = disk_use(layer.path)
    return {
        "layer": {
            "path": str(layer.path),
            "bytes": own.bytes_used if own else _layer_bytes(layer),
        },
        # Its own disk (resources.disk), as the guest's df sees it; null without one.
        "disk": dataclasses.asdict(own) if own else None,
        "uid_range": [base, base + RANGE - 1] if base else None,
        "image_version": version.name if version else None,
        # Who it is: kept by export and import, and so by migrate (on another host).
        "machine_id": layer.machine_id,
        "needs_restart": bool(mounted and current and mounted != current),
    }


def _layer_bytes(layer: Layer) -> int | None:
    """The layer's size, or None if it is not there or too big to count quickly (its
    guest decides how many files it holds: status must not hang on it)."""
    try:
        return disk_usage(layer.path, seconds=5.0)
    except (OSError, TimeoutError):
        return None


def run_status(args: argparse.Namespace, paths: Paths) -> int:
    require_installed(paths, args.name)
    info = status(paths, args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return Exit.OK
    machine = info["machine"]
    frozen = "" if info["freezer"] == "running" else f" ({info['freezer']}, for a copy)"
    lines = [
        ("config", info["config"]),
        ("image", info["image"] or "?"),
        ("listen", ", ".join(info["listen"]) or "-"),
        (
            "network",
            f"{info['network']}" + (f", address {info['address']}" if info["address"] else ""),
        ),
        (
            "socket",
            f"{info['socket']['unit']}: {info['socket']['state']}, {info['socket']['enabled']}",
        ),
        ("container", f"{info['container']['unit']}: {info['container']['state']}{frozen}"),
        (
            "machine",
            f"{machine['state']}, leader PID {machine['leader']}" if machine else "not running",
        ),
        ("memory", _size(info["memory_bytes"])),
        ("limits", _limits(info["limits"])),
        ("uptime", _duration(info["uptime_seconds"])),
        ("tree", info["tree"]),
        (
            "users",
            f"the guest's uid 0-{RANGE - 1} are the host's {'-'.join(map(str, uid_range))}"
            if (uid_range := info["uid_range"])
            else "the host's own (no user namespace)",
        ),
        ("layer", f"{_size(info['layer']['bytes'])} in {info['layer']['path']}"),
        *(
            [
                (
                    "disk",
                    f"{_size(d['bytes_used'])} of {_size(d['bytes_total'])} used, "
                    f"{d['inodes_used']} of {d['inodes_total']} files",
                )
            ]
            if (d := info["disk"])
            else []
        ),
        (
            "version",
            (info["image_version"] or "-")
            + (" (the image has a newer one: restart to use it)" if info["needs_restart"] else ""),
        ),
    ]
    print(args.name)
    # Shown as text: what machined, systemd or the guest's tree says must not act on
    # the terminal (--json escapes on its own).
    for label, value in lines:
        print(f"  {label + ':':<11}{shown(value)}")
    if info["failed"]:
        why = ", ".join(f"{unit} ({result})" for unit, result in info["failed"].items())
        print(f"  {'problem:':<11}systemd gave up on {shown(why)}")
        print(
            f"  {'':<11}try again: nspawnctl start {args.name}; "
            f"why: journalctl -u {service_unit(args.name)}"
        )
    waiting = {listen: n for listen, n in info["waiting"].items() if n}
    if waiting and info["container"]["state"] == "running" and info["freezer"] == "running":
        # Booted, yet connections wait: the guest no longer takes them (it stopped or
        # broke its own socket unit). Each one waits until the container restarts.
        queued = ", ".join(f"{n} on {listen}" for listen, n in waiting.items())
        print(f"  {'problem:':<11}connections wait in the host's queue ({queued}): the guest")
        print(f"  {'':<11}takes none of them (is its socket unit stopped or failed?)")
        print(
            f"  {'':<11}see: nspawnctl exec {args.name} -- systemctl --failed; "
            f"nspawnctl restart {args.name}"
        )
    return Exit.OK


def _limits(limits: dict[str, int]) -> str:
    shown: dict[str, Callable[[int], str]] = {
        "memory": _size,
        "cpu": lambda v: f"{v // 10_000}% of a CPU",
        "tasks": str,
        "io_weight": str,
    }
    return ", ".join(f"{key} {shown[key](value)}" for key, value in limits.items()) or "none"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024:
            return f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}min {secs}s" if hours else f"{minutes}min {secs}s"
