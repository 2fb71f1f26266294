"""start, stop, restart, enable, disable: one D-Bus call each on the container's units."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from nspawnctl.bus import JobError, Systemd
from nspawnctl.commands import add_name, add_verb
from nspawnctl.container import require_installed, stop_container, units_of
from nspawnctl.errors import Exit
from nspawnctl.log import log
from nspawnctl.names import mount_unit, service_unit, socket_unit
from nspawnctl.paths import Paths

Action = Callable[[Systemd, str, Paths], None]


def _start(systemd: Systemd, name: str, paths: Paths) -> None:
    # A container systemd has given up on (a failed socket or mount) is tried afresh.
    reset_failed(systemd, name, paths)
    systemd.start(socket_unit(name))
    systemd.start(service_unit(name))


def reset_failed(systemd: Systemd, name: str, paths: Paths) -> None:
    for unit, state in systemd.states(units_of(paths, name)).items():
        if state.active == "failed":
            systemd.reset_failed(unit)


def _stop(systemd: Systemd, name: str, paths: Paths) -> None:
    stop_container(systemd, name)


def _restart(systemd: Systemd, name: str, paths: Paths) -> None:
    # Not RestartUnit: the root's mount stays needed through a restart job, so the
    # container would come back on the image version it had. Unmount in between.
    _stop(systemd, name, paths)
    try:
        systemd.stop(mount_unit(paths.machine_dir(name)))
    except JobError as err:
        if err.result != "canceled":
            raise
        # A connection came (or one waited in the socket's queue) and booted it again
        # before its root was unmounted: its start job took the place of our unmount.
        log.info("%s was booted again by a connection, on the same image version", name)
    systemd.start(service_unit(name))


def _enable(systemd: Systemd, name: str, paths: Paths) -> None:
    systemd.enable([socket_unit(name)])
    systemd.reload()


def _disable(systemd: Systemd, name: str, paths: Paths) -> None:
    systemd.disable([socket_unit(name)])
    systemd.reload()


_VERBS: dict[str, tuple[Action, str, str]] = {
    "start": (_start, "boot a container now (waits until its boot has finished)", "started"),
    "stop": (_stop, "power a container off; its socket keeps listening", "stopped"),
    "restart": (
        _restart,
        "power a container off and boot it again, on its image's newest version",
        "restarted",
    ),
    "enable": (_enable, "listen on the container's socket from the next boot on", "enabled"),
    "disable": (_disable, "do not listen on the socket at boot any more", "disabled"),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for verb, (_action, help_text, _done) in _VERBS.items():
        add_name(add_verb(sub, verb, help_text, run))


def run(args: argparse.Namespace, paths: Paths) -> int:
    action, _help, done = _VERBS[args.verb]
    require_installed(paths, args.name)
    with Systemd.connect() as systemd:
        action(systemd, args.name, paths)
    log.info("%s %s", done, args.name)
    return Exit.OK
