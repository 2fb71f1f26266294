"""which: the container a host process belongs to (as OpenVZ's vzpid)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nspawnctl.bus import Systemd
from nspawnctl.commands import add_verb
from nspawnctl.errors import Exit, OperationError, UsageError
from nspawnctl.paths import Paths
from nspawnctl.screen import shown


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "print the name of the container that a process of the host belongs to"
    p = add_verb(sub, "which", help_text, run_which)
    p.add_argument("pid", metavar="PID", type=_pid, help="a process ID as the host sees it")


def _pid(text: str) -> int:
    # machined reads PID 0 as "the caller": never ask it that.
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process ID")
    return int(text)


def run_which(args: argparse.Namespace, paths: Paths) -> int:
    # machined's name for it, as text: a machine nspawnctl did not register is named by
    # whoever did.
    print(shown(container_of(args.pid)))
    return Exit.OK


def container_of(pid: int) -> str:
    """The name of the machine (nspawnctl's or not) that machined places the process in,
    by its control group. Raises for a process of the host and for no process."""
    with Systemd.connect() as systemd:
        name = systemd.machine_of_pid(pid)
    if name is not None:
        return name
    # machined says the same for both; asked after it, so that a process that ended
    # meanwhile is called gone, not the host's.
    if not Path(f"/proc/{pid}").exists():
        raise UsageError(f"no process {pid}", hint="see `ps -e`; the PID is the host's")
    raise OperationError(
        f"process {pid} belongs to the host, not to a container",
        hint="`machinectl list` shows the running containers",
    )
