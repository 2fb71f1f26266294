"""Every subprocess nspawnctl starts goes through `run` (or `run_interactive`, `run_lines`)."""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal

from nspawnctl.errors import OperationError
from nspawnctl.log import log

Argv = Sequence[str | Path]

# Children get a known environment, not whatever the caller's shell exported:
# locale-dependent output and stray variables (LISTEN_FDS!) change behaviour.
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _environment(extra: Mapping[str, str] | None, keep: Sequence[str] = ()) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", _PATH), "LANG": "C.UTF-8"}
    env.update({k: os.environ[k] for k in keep if k in os.environ})
    env.update(extra or {})
    return env


def run(
    argv: Argv,
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv, capturing its output. With `progress`, output lines are streamed to it
    as they come (stderr merged into stdout). Raises OperationError on failure if `check`."""
    args = [str(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        if progress is None:
            proc = subprocess.run(
                args,
                input=input,
                capture_output=True,
                text=True,
                env=_environment(env),
                stdin=None if input is not None else subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        else:
            proc = _stream(args, env, progress)
    except FileNotFoundError:
        raise OperationError(
            f"{args[0]}: command not found", hint="install it, see README.md"
        ) from None
    except subprocess.TimeoutExpired:
        raise OperationError(f"{args[0]} did not finish within {timeout} s") from None
    if check and proc.returncode != 0:
        raise command_failed(args, proc.returncode, proc.stderr or proc.stdout)
    return proc


def _stream(
    args: list[str], env: Mapping[str, str] | None, progress: Callable[[str], None]
) -> subprocess.CompletedProcess[str]:
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_environment(env),
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            progress(line)
    return subprocess.CompletedProcess(args, proc.returncode, "".join(tail), "")


StreamName = Literal["stdout", "stderr"]
LineSink = Callable[[StreamName, str], None]


def run_lines(argv: Argv, on_line: LineSink, *, env: Mapping[str, str] | None = None) -> int:
    """Run argv with stdin from /dev/null and hand each line of its stdout and of its
    stderr, without the newline, to `on_line` as it comes; return the exit code. The
    streams stay apart, so stderr can go on being stderr. Safe to call from threads."""
    args = [str(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",  # a command's binary output must not end the reading
            env=_environment(env),
        )
    except FileNotFoundError:
        raise OperationError(
            f"{args[0]}: command not found", hint="install it, see README.md"
        ) from None
    with proc:
        assert proc.stdout is not None and proc.stderr is not None
        # One reader per pipe: reading one while the command fills the other one's
        # pipe buffer would block both for good.
        failed: list[BaseException] = []
        reader = threading.Thread(target=_pump, args=(proc, proc.stderr, "stderr", on_line, failed))
        reader.start()
        _pump(proc, proc.stdout, "stdout", on_line, failed)
        reader.join()
        if failed:
            raise failed[0]
    return proc.returncode


def _pump(
    proc: subprocess.Popen[str],
    pipe: IO[str],
    stream: StreamName,
    on_line: LineSink,
    failed: list[BaseException],
) -> None:
    try:
        for line in pipe:
            on_line(stream, line.removesuffix("\n"))
    except BaseException as err:
        # on_line failed (our own stdout closed, say). Nobody reads this pipe any more:
        # close it, so that whoever writes to it (the command, or a process it handed
        # the pipe to) gets EPIPE instead of waiting on a full pipe for ever.
        failed.append(err)
        pipe.close()
        proc.kill()


def command_failed(args: Sequence[str], code: int, output: str) -> OperationError:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    detail = lines[-1].strip() if lines else "no output"
    return OperationError(
        f"{shlex.join(args)[:200]} failed (exit code {code}): {detail}",
        hint="run again with --debug to see every command",
    )


def run_interactive(argv: Argv, *, env: Mapping[str, str] | None = None) -> int:
    """Run argv on the caller's terminal (stdin, stdout, stderr passed through)."""
    args = [str(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        return subprocess.call(
            args, env=_environment(env, keep=("TERM", "HOME", "PAGER", "SYSTEMD_PAGER"))
        )
    except FileNotFoundError:
        raise OperationError(f"{args[0]}: command not found") from None
