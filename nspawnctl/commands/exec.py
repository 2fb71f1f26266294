"""exec and shell: run something inside a container, or in many, booting them if needed."""

from __future__ import annotations

import argparse
import os
import sys
import threading

from nspawnctl.commands import add_name, add_verb
from nspawnctl.errors import Exit, UsageError
from nspawnctl.fleet import DEFAULT_JOBS, Outcome, booted_leader, guest_command, run_in_each, select
from nspawnctl.log import log
from nspawnctl.names import check_machine_name
from nspawnctl.paths import Paths
from nspawnctl.run import StreamName, run_interactive, run_relayed
from nspawnctl.screen import shown

_USAGE = """nspawnctl exec NAME [--] CMD [ARG...]
       nspawnctl exec [--running] [--jobs N] (--all | NAME...) -- CMD [ARG...]"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "run a command in a container (booting it if needed); exits with its code"
    description = (
        f"{help_text}. With --all or several NAMEs: in each of them, a few at a time, "
        "every output line prefixed with the container's name, then a summary; exit "
        "status 1 if it failed in any. Containers booted for it are powered off again."
    )
    p = add_verb(sub, "exec", help_text, run_exec, description=description, usage=_USAGE)
    p.add_argument("--all", action="store_true", help="in every container")
    p.add_argument(
        "--running",
        action="store_true",
        help="skip containers that are not running instead of booting them for it",
    )
    p.add_argument(
        "--jobs",
        type=_jobs,
        metavar="N",
        help=f"in at most N containers at once (default {DEFAULT_JOBS})",
    )
    # Everything after the options: NAMEs up to `--`, then the command (options of the
    # command, such as `ls -l`, stay the command's).
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="NAME... -- CMD")
    shell = "an interactive root shell in a container (booting it if needed)"
    add_name(add_verb(sub, "shell", shell, run_shell))


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def _names_and_command(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """NAMEs before the first `--`, the command after it; without `--`, the first word
    is the one NAME (as `exec NAME CMD` always was), or none with --all."""
    words: list[str] = args.words
    if "--" in words:
        cut = words.index("--")
        names, command = words[:cut], words[cut + 1 :]
    else:
        names, command = ([], words) if args.all else (words[:1], words[1:])
    if args.all and names:
        raise UsageError(
            f"--all and the names {' '.join(names)} do not go together",
            hint="nspawnctl exec --all -- CMD, or nspawnctl exec NAME... -- CMD",
        )
    if not args.all and not names:
        raise UsageError(
            "no container named", hint="nspawnctl exec NAME... -- CMD, or --all for every one"
        )
    for name in names:
        try:
            check_machine_name(name)
        except ValueError as err:
            raise UsageError(
                f"{name!r} {err}", hint="NAMEs go before `--`, the command after it"
            ) from None
    if not command:
        target = "--all" if args.all else " ".join(names)
        raise UsageError("no command given", hint=f"nspawnctl exec {target} -- CMD")
    return names, command


def run_exec(args: argparse.Namespace, paths: Paths) -> int:
    names, command = _names_and_command(args)
    if args.all or len(names) > 1 or args.running or args.jobs is not None:
        return _run_fleet(args, paths, names, command)
    booted_leader(paths, names[0])
    # The exit status passed through either way. The guest's root may keep whatever
    # file descriptors it is given, and use them after the command has returned: write
    # to them, read from them, change a terminal's modes. On a terminal (stdin, stdout
    # and stderr all one), systemd-run --pty gives the command a pseudo-terminal of the
    # guest's and copies between it and ours: the guest never holds our terminal.
    # Otherwise (`| cat`, `> FILE`, `< FILE`, stdin alone a terminal) the command gets
    # pipes of nspawnctl's own, which copies its stdin into the one and the others to
    # its stdout and stderr until the command ends, and then closes them: the guest gets
    # neither the terminal nor the caller's pipe or file. (Left to choose, as with
    # `--pipe --pty`, systemd-run handed our terminal itself to the guest whenever one
    # of the three was not a terminal.)
    if all(os.isatty(fd) for fd in (0, 1, 2)):
        return run_interactive(guest_command(names[0], command, pty=True))
    return run_relayed(guest_command(names[0], command, pty=False))


def _run_fleet(args: argparse.Namespace, paths: Paths, names: list[str], command: list[str]) -> int:
    targets, skipped = select(paths, None if args.all else names)
    if not targets and not skipped:
        log.info("no containers: nothing to run")
        return Exit.OK
    outcomes = run_in_each(
        paths,
        targets,
        command,
        _Prefixed(),
        jobs=args.jobs or DEFAULT_JOBS,
        running_only=args.running,
    )
    return _summarise([*outcomes, *skipped])


class _Prefixed:
    """Prints each container's lines whole, prefixed with its name, on the stream they
    came on; the containers' threads print through one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, name: str, stream: StreamName, line: str) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        # The guest's line as text: an escape sequence in it could move back over the
        # prefix and forge another container's line, or nspawnctl's summary. What the
        # stream cannot encode (a non-UTF-8 locale) is escaped, not an error.
        text = shown(line).encode(out.encoding or "utf-8", "backslashreplace")
        with self._lock:
            print(f"{name}: {text.decode(out.encoding or 'utf-8')}", file=out, flush=True)


def _summarise(outcomes: list[Outcome]) -> int:
    """The summary on stderr (stdout is the commands' output); 1 if any failed."""
    succeeded = [o.name for o in outcomes if not o.failed and o.skipped is None]
    failed = [o for o in outcomes if o.failed]
    skipped = [o for o in outcomes if o.skipped is not None]
    booted = [o.name for o in outcomes if o.powered_off]
    if succeeded:
        log.info("succeeded (%d): %s", len(succeeded), ", ".join(succeeded))
    if failed:
        log.info("failed (%d): %s", len(failed), ", ".join(map(_failure, failed)))
    if skipped:
        log.info(
            "skipped (%d): %s", len(skipped), ", ".join(f"{o.name} ({o.skipped})" for o in skipped)
        )
    if booted:
        log.info("booted for it and powered off again: %s", ", ".join(booted))
    return Exit.FAILED if failed else Exit.OK


def _failure(outcome: Outcome) -> str:
    why = [f"exit code {outcome.exit_code}"] if outcome.exit_code not in (None, 0) else []
    why += [shown(outcome.problem)] if outcome.problem else []
    return f"{outcome.name} ({'; '.join(why)})"


def run_shell(args: argparse.Namespace, paths: Paths) -> int:
    booted_leader(paths, args.name)
    return run_interactive(["machinectl", "shell", "--quiet", f"root@{args.name}"])
