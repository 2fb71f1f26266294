"""Holding a container stopped while a verb works on its layer.

Its socket keeps listening throughout: stopping it would refuse the connections that
arrive meanwhile. Instead every boot passes a gate first (units/container.gate.j2), a
oneshot that takes a shared lock on the container's hold file (Paths.hold_file)
before its root is mounted. A verb holds that lock exclusively: a connection that
arrives meanwhile waits in the host's socket (its boot waits at the gate), and is
served once the verb is done."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from nspawnctl.bus import Systemd, UnitState
from nspawnctl.names import gate_unit, mount_unit, service_unit
from nspawnctl.paths import Paths

_DOWN = ("inactive", "failed")


@contextlib.contextmanager
def held(systemd: Systemd, paths: Paths, name: str) -> Iterator[bool]:
    """Hold container `name` as it is: no boot starts meanwhile. Yields whether it is
    running, or booting past its gate already (then the verb refuses, or works on a
    live container). Never start the container while holding it: its boot would wait
    for this very hold."""
    fd = open_hold_file(paths, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        gate, mount = gate_unit(name), mount_unit(paths.machine_dir(name))
        service = service_unit(name)
        states = systemd.states([gate, mount, service])
        stopping = [u for u in (service, mount) if _stopping(states[u])]
        if stopping:
            # A power-off under way (just asked for, or the root still being unmounted)
            # ends in a stopped container: wait for it, as a stop job of our own would.
            for unit in stopping:
                systemd.stop(unit)
            states = systemd.states([gate, mount, service])
        yield _under_way(states, gate, mount, service)
    finally:
        os.close(fd)  # releases the lock: a boot waiting at the gate goes on


def open_hold_file(paths: Paths, name: str) -> int:
    """The container's hold file, made if missing (`add` makes it: its gate needs it)."""
    path = paths.hold_file(name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _stopping(state: UnitState) -> bool:
    return state.active == "deactivating" or state.job == "stop"


def _under_way(states: dict[str, UnitState], gate: str, mount: str, service: str) -> bool:
    if states[service].active not in _DOWN or states[mount].active not in _DOWN:
        return True
    # Start jobs queued for the mount or the service come from a boot. One that has not
    # passed the gate (its job still queued, or running and waiting for this hold) waits
    # for us; one that has is under way.
    waits = bool(states[gate].job) or states[gate].active == "activating"
    return bool(states[mount].job or states[service].job) and not waits
