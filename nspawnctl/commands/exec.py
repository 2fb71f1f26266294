"""exec and shell: run something inside a container, booting it first if needed."""

from __future__ import annotations

import argparse

from nspawnctl.bus import Systemd
from nspawnctl.commands.lifecycle import require_installed
from nspawnctl.errors import OperationError, UsageError
from nspawnctl.names import machine_name, service_unit
from nspawnctl.paths import Paths
from nspawnctl.run import run_interactive


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "run a command in a container (booting it if needed); exits with its code"
    p = sub.add_parser(
        "exec", help=help_text, description=help_text, usage="nspawnctl exec NAME -- CMD [ARG...]"
    )
    p.add_argument("name", metavar="NAME", type=machine_name)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    p.set_defaults(handler=run_exec)
    help_text = "an interactive root shell in a container (booting it if needed)"
    p = sub.add_parser("shell", help=help_text, description=help_text)
    p.add_argument("name", metavar="NAME", type=machine_name)
    p.set_defaults(handler=run_shell)


def booted_leader(paths: Paths, name: str) -> int:
    """Boot the container if it is not running; the start job ends once its boot has
    finished (NotifyReady=yes). Returns the PID of its init as seen from the host."""
    require_installed(paths, name)
    with Systemd.connect() as systemd:
        systemd.start(service_unit(name))
        machine = systemd.machine(name)
    if machine is None:
        raise OperationError(
            f"{name} started but is not registered with systemd-machined",
            hint=f"see `journalctl -u {service_unit(name)}`",
        )
    return machine.leader


def run_exec(args: argparse.Namespace, paths: Paths) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("no command given", hint=f"nspawnctl exec {args.name} -- CMD")
    booted_leader(paths, args.name)
    # A transient unit of the guest's own systemd: the command runs in the container's
    # cgroup, under its seccomp filter and capability bounds, not as a host process
    # entered into its namespaces. --pipe keeps stdout, stderr and the exit code apart
    # for scripts; on a terminal --pty takes over.
    return run_interactive(
        [
            "systemd-run",
            f"--machine={args.name}",
            "--quiet",
            "--wait",
            "--collect",
            # Both given, systemd-run uses --pty when stdin, stdout and stderr are a
            # terminal, and --pipe otherwise (systemd-run(1)).
            "--pipe",
            "--pty",
            "--working-directory=/root",
            "--setenv=HOME=/root",
            "--setenv=LANG=C.UTF-8",
            "--",
            *command,
        ]
    )


def run_shell(args: argparse.Namespace, paths: Paths) -> int:
    booted_leader(paths, args.name)
    return run_interactive(["machinectl", "shell", "--quiet", f"root@{args.name}"])
