"""A guest's root attacks the admin who runs `exec` in it: escape sequences that would
forge another container's lines or nspawnctl's summary, a pipe handed to a process that
outlives the command, a line that never ends, and the admin's own terminal kept to write
to and to turn echo off after exec has returned. Real containers in a test host."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.integration.conftest import CLIENT_KEY, nspawnctl
from tests.testhost import TestHost

NAMES = ("hx1", "hx2")
NSPAWNCTL = f"{sys.executable} -m nspawnctl"


@pytest.fixture(scope="module")
def guests(host: TestHost) -> Iterator[tuple[str, ...]]:
    for port, name in enumerate(NAMES, start=2601):
        nspawnctl(host, "add", name, "--ssh", str(port), "--key", f"{CLIENT_KEY}.pub")
    for name in NAMES:
        nspawnctl(host, "start", name)
    yield NAMES


def cli(
    host: TestHost, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """nspawnctl in the host, with stdin and a timeout of the test's own."""
    argv = [sys.executable, "-m", "nspawnctl", *args]
    return host.run(argv, check=check, input=input, timeout=timeout)


def put(host: TestHost, name: str, path: str, text: str) -> None:
    """Write a file in the guest, through exec's stdin."""
    cli(host, "exec", name, "--", "sh", "-c", f"cat > {path}", input=text)


def kept_by(unit: str) -> str:
    """Shell: hand this command's stdout and stderr (and stdin) to a process in a scope
    unit of its own, out of the command's unit, so that it outlives the command; go on
    once that unit runs (not before: ending with the command would kill it)."""
    return (
        f"exec 3<&0; systemd-run --quiet --scope --unit={unit} sleep 1000 0<&3 3<&- & "
        f"until systemctl is-active -q {unit}.scope; do sleep 0.1; done"
    )


def stop_unit(host: TestHost, name: str, unit: str) -> None:
    host.run(["systemctl", f"--machine={name}", "stop", unit], check=False)


def test_escape_sequences_cannot_forge_lines(host: TestHost, guests: tuple[str, ...]) -> None:
    # Each guest moves back over its prefix and writes the other's name, sets the window
    # title, prints a summary of nspawnctl's, a C1 CSI, a bidi override, and a forged
    # escape of its own (four characters: backslash, x, 1, b).
    script = (
        r'other=$([ "$(hostname)" = hx1 ] && echo hx2 || echo hx1); '
        r'printf "\033[2K\r%s: forged\n" "$other"; '
        r'printf "\033]0;owned\007title\n"; '
        r'printf "\rnspawnctl: succeeded (2): hx1, hx2\n" >&2; '
        r"printf '\302\2332J\342\200\256evil\n'; "
        r"printf '%s\n' '\x1b'; "
        r'printf "no end of line"'
    )
    run = nspawnctl(host, "exec", "--all", "--", "sh", "-c", script)
    for stream in (run.stdout, run.stderr):
        assert not set(stream) & {"\x1b", "\r", "\x07", "\x9b", "\u202e"}, repr(stream)
    for name, other in (("hx1", "hx2"), ("hx2", "hx1")):
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith(f"{name}: ")]
        assert lines == [
            f"{name}: \\x1b[2K\\x0d{other}: forged",
            f"{name}: \\x1b]0;owned\\x07title",
            f"{name}: \\x9b2J\\u202eevil",
            f"{name}: \\\\x1b",
            f"{name}: no end of line",
        ]
        assert f"{name}: \\x0dnspawnctl: succeeded (2): hx1, hx2" in run.stderr.splitlines()
    assert len(run.stdout.splitlines()) == 10  # every line is one of the above
    # The one summary at the start of a line is nspawnctl's own.
    assert [ln for ln in run.stderr.splitlines() if ln.startswith("nspawnctl:")] == [
        "nspawnctl: succeeded (2): hx1, hx2"
    ]


def test_a_pipe_kept_by_a_guest_does_not_hold_exec(host: TestHost, guests: tuple[str, ...]) -> None:
    unit = f"keeper-{secrets.token_hex(3)}"
    script = f"echo before; {kept_by(unit)}; echo after"
    try:
        # Before: exec --all read until the end of its pipes, which the kept process
        # holds for 1,000 s; the run's own timeout is the bound.
        run = cli(host, "exec", "--all", "--", "sh", "-c", script, timeout=60)
        assert sorted(run.stdout.splitlines()) == [
            "hx1: after",
            "hx1: before",
            "hx2: after",
            "hx2: before",
        ]
        assert "nspawnctl: succeeded (2): hx1, hx2" in run.stderr.splitlines()
        # The attack was live: the keepers still run, holding the (closed) pipes.
        for name in guests:
            active = host.run(["systemctl", f"--machine={name}", "is-active", f"{unit}.scope"])
            assert active.stdout == "active\n"
    finally:
        for name in guests:
            stop_unit(host, name, f"{unit}.scope")


def test_a_line_without_end_is_cut_not_hoarded(host: TestHost, guests: tuple[str, ...]) -> None:
    size = 64 * 1024 * 1024
    script = f"head -c {size} /dev/zero | tr '\\0' x; printf '\\nlast'"
    # nspawnctl's peak memory (GNU time's %M, KiB); the lines counted by awk, so that
    # 128 MiB of output does not come back to the test.
    count = "awk '{ if (length($0) > m) m = length($0); n++ } END { print n, m }'"
    shell = f"/usr/bin/time -f 'rss %M' {NSPAWNCTL} exec --all -- sh -c \"{script}\" | {count}"
    run = host.run(["sh", "-c", shell], timeout=300)
    lines, longest = map(int, run.stdout.split())
    piece = 64 * 1024
    assert longest == len("hx1: ") + piece
    assert lines == 2 * (size // piece + 1)  # the pieces, then `last`, in each
    rss_kib = int(next(ln for ln in run.stderr.splitlines() if ln.startswith("rss ")).split()[1])
    # Measured: 32 MB for two lines of 200 MB each (before: 1.5 GB).
    assert rss_kib < 100 * 1024, run.stderr


def test_a_failure_of_any_kind_is_the_containers_own(
    host: TestHost, guests: tuple[str, ...]
) -> None:
    # Not an NspawnctlError: an exception in handing on hx1's output. hx2 still runs
    # and is reported as it is.
    program = """
import json
from nspawnctl import fleet
from nspawnctl.paths import Paths
def on_line(name, stream, line):
    if name == "hx1":
        raise RuntimeError("sink broke")
outcomes = fleet.run_in_each(Paths.from_env(), ["hx1", "hx2"], ["echo", "hi"], on_line)
print(json.dumps([[o.name, o.exit_code, o.problem, o.failed] for o in outcomes]))
"""
    run = host.run([sys.executable, "-c", program])
    assert json.loads(run.stdout) == [
        ["hx1", None, "RuntimeError: sink broke", True],
        ["hx2", 0, None, False],
    ]


@pytest.mark.parametrize("redirect", ["| cat", "> /tmp/exec-out"])
def test_one_exec_does_not_hand_the_terminal_to_the_guest(
    host: TestHost, guests: tuple[str, ...], redirect: str
) -> None:
    """stdin a terminal, stdout not: before, systemd-run handed the admin's terminal
    itself to the guest, which wrote to it and turned its echo off after exec had
    returned, and kept `| cat` from ever ending."""
    mark = secrets.token_hex(3)
    returned, wrote, unit = f"/root/returned-{mark}", f"/root/wrote-{mark}", f"writer-{mark}"
    # In the guest: a process outside the command's unit keeps its stdin, stdout and
    # stderr; once exec has returned it writes to all three and turns echo off.
    attack = f"""trap '' PIPE
exec 3<&0
systemd-run --quiet --scope --unit={unit} sh -c '
  trap "" PIPE
  until [ -e {returned} ]; do sleep 0.1; done
  echo PWNED-OUT; echo PWNED-ERR >&2; echo PWNED-IN >&0; stty -echo <&0
  touch {wrote}' 0<&3 3<&- &
until systemctl is-active -q {unit}.scope; do sleep 0.1; done
echo started
"""
    put(host, "hx1", "/root/attack.sh", attack)
    # The admin's session on a terminal (script's pseudo-terminal): exec, then tell the
    # guest it returned, wait until the guest has done its worst, and look at the echo.
    session = f"""{NSPAWNCTL} exec hx1 -- sh /root/attack.sh {redirect}
echo "exec returned: $?"
{NSPAWNCTL} exec hx1 -- touch {returned}
{NSPAWNCTL} exec hx1 -- sh -c 'until [ -e {wrote} ]; do sleep 0.1; done'
stty -a | grep -o -- ' -\\?echo '
echo END
"""
    host.write_file("/root/session.sh", session)
    host.run(["rm", "-f", "/tmp/exec-out"])
    try:
        run = host.run(["script", "-qfec", "sh /root/session.sh", "/dev/null"], timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the session hung: the guest holds its pipe (or exec does not return)")
    finally:
        stop_unit(host, "hx1", f"{unit}.scope")
    terminal = run.stdout.replace("\r", "")
    assert "exec returned: 0\n" in terminal and terminal.endswith("END\n"), terminal
    assert "PWNED" not in terminal
    assert " -echo " not in terminal and " echo " in terminal  # echo still on
    if redirect.startswith(">"):
        assert host.run(["cat", "/tmp/exec-out"]).stdout == "started\n"
    else:
        assert "started\n" in terminal


def test_one_exec_with_pipes_and_a_terminal_still_works(
    host: TestHost, guests: tuple[str, ...]
) -> None:
    # stdin, stdout and stderr relayed: the exit code, stderr apart, bytes unchanged.
    script = "cat; printf 'err\\033[m\\n' >&2; exit 3"
    run = cli(host, "exec", "hx1", "--", "sh", "-c", script, check=False, input="a\nb\n")
    assert (run.returncode, run.stdout, run.stderr) == (3, "a\nb\n", "err\x1b[m\n")
    # What is typed at the terminal still reaches a command whose stdout is a pipe.
    session = f"{NSPAWNCTL} exec hx1 -- sh -c 'read x; echo \"got:$x\"' | cat"
    typed = host.run(["script", "-qfec", session, "/dev/null"], input="typed\n", timeout=60)
    assert "got:typed" in typed.stdout
