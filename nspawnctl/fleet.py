"""Running commands in containers: in one (exec, shell), or in many at once (exec --all,
exec NAME NAME...): a bounded number at a time, each output line handed on with the
container's name, and the containers booted for the command powered off again."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nspawnctl.bus import Systemd
from nspawnctl.container import config_names, is_installed, is_running, stop_container
from nspawnctl.errors import NspawnctlError, OperationError, UsageError
from nspawnctl.log import log
from nspawnctl.names import service_unit
from nspawnctl.paths import Paths
from nspawnctl.run import StreamName, run_lines

# Each container in flight is a booted guest and a systemd-run: a few at a time keep a
# small host responsive, and a hundred containers never boot at once.
DEFAULT_JOBS = 8

OutputSink = Callable[[str, StreamName, str], None]  # container, stream, line


@dataclass(frozen=True)
class Outcome:
    """What became of the command in one container."""

    name: str
    exit_code: int | None = None  # the command's; None: it did not run
    problem: str | None = None  # what failed around it: the boot, the power-off
    skipped: str | None = None  # why it was not run at all (not a failure)
    booted: bool = False  # booted for the command
    powered_off: bool = False  # and powered off again afterwards

    @property
    def failed(self) -> bool:
        return self.skipped is None and (self.exit_code != 0 or self.problem is not None)


def booted_leader(paths: Paths, name: str) -> int:
    """Boot the container if it is not running; the start job ends once its boot has
    finished (NotifyReady=yes). Returns the PID of its init as seen from the host."""
    if not is_installed(paths, name):
        raise UsageError(f"no container {name!r}", hint="see `nspawnctl list`")
    with Systemd.connect() as systemd:
        systemd.start(service_unit(name))
        machine = systemd.machine(name)
    if machine is None:
        raise OperationError(
            f"{name} started but is not registered with systemd-machined",
            hint=f"see `journalctl -u {service_unit(name)}`",
        )
    return machine.leader


def guest_command(name: str, command: Sequence[str], *, pty: bool) -> list[str]:
    """The systemd-run command line that runs `command` in the container: on a
    pseudo-terminal of the guest's with `pty`, else with systemd-run's own stdin, stdout
    and stderr handed to it."""
    # A transient unit of the guest's own systemd: the command runs in the container's
    # cgroup, under its seccomp filter and capability bounds, not as a host process
    # entered into its namespaces. --wait: systemd-run exits with the command's status,
    # once its unit has ended. --pipe hands systemd-run's own file descriptors to the
    # guest, which can keep them for as long as it likes (a process moved out of the
    # unit, one it passes them to): so it must only ever be given pipes that nspawnctl
    # closes when the command ends (run_lines, run_relayed), never the admin's terminal
    # or pipe. --pty allocates a pseudo-terminal in the guest and copies between it and
    # ours: the guest never holds our terminal. Not both: given both, systemd-run picks
    # --pipe whenever one of stdin, stdout and stderr is not a terminal, and would hand
    # the others, terminals, to the guest. A fixed --description: the one systemd-run
    # derives from the command line goes into the transient unit's file unescaped (before
    # systemd 254), so after a daemon-reload by the command itself the lines of a
    # multi-line `sh -c` script are read back as settings of its own unit, and --wait
    # never returns.
    return [
        "systemd-run",
        f"--machine={name}",
        "--description=nspawnctl exec",
        "--quiet",
        "--wait",
        "--collect",
        "--pty" if pty else "--pipe",
        "--working-directory=/root",
        "--setenv=HOME=/root",
        "--setenv=LANG=C.UTF-8",
        "--",
        *command,
    ]


def select(paths: Paths, names: Sequence[str] | None) -> tuple[list[str], list[Outcome]]:
    """The containers to run in, and those skipped. `names` None: every container with a
    file; one whose units are not installed is skipped. The file is not read, so a
    broken one stops nothing. Named containers must all be installed (or nothing runs)."""
    if names is None:
        every = config_names(paths)
        installed = [n for n in every if is_installed(paths, n)]
        skipped = [
            Outcome(n, skipped=f"not installed: see `nspawnctl add {n}`")
            for n in every
            if n not in installed
        ]
        return installed, skipped
    missing = [n for n in names if not is_installed(paths, n)]
    if missing:
        raise UsageError(
            f"no container {', '.join(map(repr, missing))}", hint="see `nspawnctl list`"
        )
    return list(dict.fromkeys(names)), []


def run_in_each(
    paths: Paths,
    names: Sequence[str],
    command: Sequence[str],
    on_line: OutputSink,
    *,
    jobs: int = DEFAULT_JOBS,
    running_only: bool = False,
) -> list[Outcome]:
    """Run `command` in each container, in at most `jobs` at once; one Outcome per name,
    in their order. A container that is not running is booted for it and powered off
    again afterwards, or skipped with `running_only`."""
    run_one = functools.partial(
        _run_in_one, paths, command=command, on_line=on_line, running_only=running_only
    )
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="nspawnctl-exec")
    try:
        futures = [pool.submit(run_one, name) for name in names]
        return [future.result() for future in futures]
    finally:
        # On Ctrl-C: boot no more; those under way finish and are powered off again.
        pool.shutdown(wait=True, cancel_futures=True)


def _run_in_one(
    paths: Paths, name: str, *, command: Sequence[str], on_line: OutputSink, running_only: bool
) -> Outcome:
    try:
        with Systemd.connect() as systemd:
            # Read now, not when the run began: meanwhile it may have booted or stopped.
            booted = not is_running(systemd, name)
    except Exception as err:
        return Outcome(name, problem=_problem(err))
    if booted and running_only:
        return Outcome(name, skipped="not running")
    exit_code: int | None = None
    problems: list[str] = []
    powered_off = False
    try:
        booted_leader(paths, name)
        exit_code = run_lines(
            guest_command(name, command, pty=False), functools.partial(on_line, name)
        )
    except Exception as err:
        # Whatever went wrong is this container's: the others go on, and the summary
        # names it as failed.
        problems.append(_problem(err))
    finally:
        # Only what this booted: a container that was running stays as it was.
        if booted:
            try:
                with Systemd.connect() as systemd:
                    stop_container(systemd, name)
                powered_off = True
            except Exception as err:
                problems.append(f"not powered off again: {_problem(err)}")
    return Outcome(
        name,
        exit_code=exit_code,
        problem="; ".join(problems) or None,
        booted=booted,
        powered_off=powered_off,
    )


def _problem(err: Exception) -> str:
    if isinstance(err, NspawnctlError):
        return err.message
    log.debug("%s", err, exc_info=err)  # with --debug, the traceback
    return f"{type(err).__name__}: {err}"
