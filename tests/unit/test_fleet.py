"""The pure parts of fleet operations: how `exec` reads NAMEs and the command, what
counts as a failure, and run_lines keeping stdout and stderr apart, line by line."""

from __future__ import annotations

import pytest

from nspawnctl import cli
from nspawnctl.commands.exec import _names_and_command
from nspawnctl.errors import UsageError
from nspawnctl.fleet import Outcome
from nspawnctl.run import StreamName, run_lines


def split(*argv: str) -> tuple[list[str], list[str]]:
    return _names_and_command(cli.build_parser().parse_args(["exec", *argv]))


@pytest.mark.parametrize(
    ("argv", "names", "command"),
    [
        (["web", "--", "ls", "-l"], ["web"], ["ls", "-l"]),
        (["web", "ls", "-l"], ["web"], ["ls", "-l"]),  # one NAME: `--` optional, as ever
        (["web", "--", "sh", "-c", "x", "--", "y"], ["web"], ["sh", "-c", "x", "--", "y"]),
        (["web", "db", "--", "hostname"], ["web", "db"], ["hostname"]),
        (["--all", "--", "ls", "--all"], [], ["ls", "--all"]),
        (["--all", "hostname"], [], ["hostname"]),
        (["--jobs", "2", "--running", "web", "--", "true"], ["web"], ["true"]),
    ],
)
def test_names_and_command(argv: list[str], names: list[str], command: list[str]) -> None:
    assert split(*argv) == (names, command)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["web"], "no command given"),
        (["--all"], "no command given"),
        (["--all", "web", "--", "ls"], "--all and the names web"),
        (["--", "ls"], "no container named"),
        (["web", "a_b", "--", "ls"], "'a_b' is not a valid container name"),
    ],
)
def test_bad_exec_command_lines(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        split(*argv)


def test_what_counts_as_failed() -> None:
    assert not Outcome("a", exit_code=0).failed
    assert Outcome("a", exit_code=3).failed
    assert Outcome("a", exit_code=0, problem="not powered off again").failed
    assert Outcome("a", problem="start failed").failed  # it never ran
    assert not Outcome("a", skipped="not running").failed


def test_run_lines_keeps_the_streams_apart() -> None:
    lines: list[tuple[StreamName, str]] = []
    script = "echo one; echo two >&2; printf 'no newline'; exit 7"
    code = run_lines(["sh", "-c", script], lambda stream, line: lines.append((stream, line)))
    assert code == 7
    assert [line for line in lines if line[0] == "stdout"] == [
        ("stdout", "one"),
        ("stdout", "no newline"),
    ]
    assert [line for line in lines if line[0] == "stderr"] == [("stderr", "two")]


def test_run_lines_ends_the_command_when_nobody_reads() -> None:
    def refuse(stream: StreamName, line: str) -> None:
        raise BrokenPipeError

    # `yes` in a child of the shell: ending the shell alone would not end the writing.
    with pytest.raises(BrokenPipeError):
        run_lines(["sh", "-c", "yes | cat; true"], refuse)
