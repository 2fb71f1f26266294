"""nspawnctl/journal.py: parsing, showing and merging entries a guest may have forged,
and opening a guest's journal directory without following what it planted there."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from nspawnctl.journal import (
    HOST,
    SOURCE_FIELD,
    Entry,
    Problems,
    Reader,
    Source,
    cursor_of,
    directory_signature,
    field_text,
    format_entry,
    journalctl_argv,
    merge_last,
    open_journal_files,
    parse_entry,
    relabel,
)

CURSOR = "s=0123abcd;i=3a;b=0123456789abcdef0123456789abcdef;m=1f;t=61f;x=abc"


def entry(stamp: int, source: str = "web", **fields: object) -> Entry:
    data: dict[str, object] = {"__REALTIME_TIMESTAMP": str(stamp), **fields}
    return Entry(stamp, source, data)


def line(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_field_text_takes_strings_bytes_and_repeated_fields() -> None:
    assert field_text("hello") == "hello"
    assert field_text([104, 105]) == "hi"
    assert field_text([120, 255, 27]) == "x\udcff\x1b"  # not UTF-8: still visible later
    assert field_text(["first", "second"]) == "first"
    assert field_text([[104], "x"]) == "h"
    assert field_text(None) is None
    assert field_text([]) is None
    assert field_text({"a": 1}) is None
    assert field_text([300]) is None


def test_parse_entry_wants_an_object_with_a_timestamp() -> None:
    parsed = parse_entry(line(__REALTIME_TIMESTAMP="1700000000000000", MESSAGE="m"), "web")
    assert parsed is not None and parsed.realtime == 1_700_000_000_000_000
    assert parsed.source == "web"
    for bad in (
        b"not json",
        b"[1, 2]",
        line(MESSAGE="no stamp"),
        line(__REALTIME_TIMESTAMP="-5"),
        line(__REALTIME_TIMESTAMP="\u0661\u0662"),  # digits, but not ASCII ones
        line(__REALTIME_TIMESTAMP=12),
        line(__REALTIME_TIMESTAMP="9" * 40),
        b"[" * 100_000,  # nesting deep enough to exhaust the recursion limit
    ):
        assert parse_entry(bad, "web") is None


def test_cursor_must_look_like_journalctls() -> None:
    assert cursor_of(entry(1, __CURSOR=CURSOR)) == CURSOR
    assert cursor_of(entry(1, __CURSOR="s=1;i=2 --file=/etc/shadow")) is None
    assert cursor_of(entry(1, __CURSOR="s=1;i=2\n")) is None
    assert cursor_of(entry(1, __CURSOR=["s=1"])) is None
    assert cursor_of(entry(1)) is None


def test_short_format_shows_the_label_not_the_guests_claims() -> None:
    forged = entry(
        1_700_000_000_250_000,
        "mallory",
        MESSAGE="hello",
        SYSLOG_IDENTIFIER="sshd",
        _PID="42",
        _HOSTNAME="victim",
        _MACHINE_ID="0" * 32,
    )
    text = format_entry(forged, "short", "mallory")
    assert text.endswith(" mallory sshd[42]: hello")
    assert "victim" not in text
    unix = format_entry(forged, "short-unix", "mallory")
    assert unix == "1700000000.250000 mallory sshd[42]: hello"
    assert ".250000 mallory" in format_entry(forged, "short-precise", "mallory")
    assert format_entry(forged, "cat", "mallory") == "hello"


def test_every_guest_string_is_shown_not_obeyed() -> None:
    hostile = entry(
        1,
        "web",
        MESSAGE=list(b"\x1b[2K\rroot@host:~# \x9b31m\xff"),
        SYSLOG_IDENTIFIER="id\x1b]0;title\x07",
        _PID="1\x1b[A",
    )
    for fmt in ("short", "short-iso", "short-precise", "short-unix", "cat"):
        text = format_entry(hostile, fmt, "web")
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text, fmt
        assert not any(0x80 <= ord(c) < 0xA0 for c in text), fmt
    assert "\\x1b[2K" in format_entry(hostile, "short", "web")


def test_a_multi_line_message_cannot_start_a_line_of_its_own() -> None:
    forged = entry(1, "mallory", MESSAGE="first\nJan 01 00:00:00 victim sshd[1]: forged\n")
    first, second = format_entry(forged, "short-unix", "mallory").split("\n")
    assert first == "0.000001 mallory unknown: first"
    indent = " " * len("0.000001 mallory unknown: ")
    assert second == indent + "Jan 01 00:00:00 victim sshd[1]: forged"


def test_missing_and_nulled_messages_and_forged_stamps() -> None:
    assert format_entry(entry(1), "cat", "w") == "[no message]"
    # journalctl writes null for a field it will not print.
    assert format_entry(entry(1, MESSAGE=None), "cat", "w") == "[message not shown]"
    far = format_entry(entry(10**19 - 1, MESSAGE="m"), "short", "w")
    assert far.startswith("@9999999999999.999999 w ")


def test_json_gets_nspawnctls_source_field_over_any_forged_one() -> None:
    forged = entry(5, "mallory", MESSAGE="m\x1b", **{SOURCE_FIELD: "victim"})
    text = format_entry(forged, "json", "ignored")
    assert "\n" not in text and "\x1b" not in text
    data = json.loads(text)
    assert data[SOURCE_FIELD] == "mallory"
    assert data["MESSAGE"] == "m\x1b"
    host = json.loads(format_entry(entry(5, HOST, MESSAGE=[1, 2]), "json", "testhost"))
    assert host[SOURCE_FIELD] == HOST and host["MESSAGE"] == [1, 2]


def test_merge_orders_by_time_and_keeps_the_last_n() -> None:
    a = [entry(1, "a"), entry(4, "a"), entry(9, "a")]
    b = [entry(2, "b"), entry(3, "b"), entry(10, "b")]
    host = [entry(5, HOST)]
    merged = list(merge_last([a, b, host], None))
    assert [e.realtime for e in merged] == [1, 2, 3, 4, 5, 9, 10]
    last = list(merge_last([iter(a), iter(b), iter(host)], 3))
    assert [(e.realtime, e.source) for e in last] == [(5, HOST), (9, "a"), (10, "b")]
    assert list(merge_last([a, b], 0)) == []


def test_merge_holds_no_more_than_n_entries() -> None:
    made = 0

    def many() -> object:
        nonlocal made
        for stamp in range(100_000):
            made += 1
            yield entry(stamp)

    last = merge_last([many()], 2)  # type: ignore[list-item]
    assert [e.realtime for e in last] == [99_998, 99_999]
    assert made == 100_000


def test_a_container_source_never_runs_journalctl_without_files() -> None:
    # Without --file=, journalctl would read the host's own journal as the guest's.
    with pytest.raises(ValueError):
        journalctl_argv(Source("web", Path("/nonexistent")), [])
    argv = journalctl_argv(Source("web", Path("/x")), [7, 9], lines=5)
    assert "--file=/proc/self/fd/7" in argv and "--file=/proc/self/fd/9" in argv
    assert "--lines=5" in argv and "--output=json" in argv
    host = journalctl_argv(Source(HOST, matches=("UNIT=a",)), [], after=CURSOR, follow=True)
    assert not any(a.startswith(("--file", "--directory", "--merge", "-m")) for a in host)
    assert host[-1] == "UNIT=a" and f"--after-cursor={CURSOR}" in host and "--follow" in host


JOURNAL_HEADER = b"LPKSHHRH" + bytes(248)


def test_only_regular_journal_files_directly_inside_are_opened(tmp_path: Path) -> None:
    (tmp_path / "system.journal").write_bytes(JOURNAL_HEADER)
    (tmp_path / "user-1000@abc.journal~").write_bytes(JOURNAL_HEADER)
    (tmp_path / "escape\x1b[31m\n.journal").write_bytes(JOURNAL_HEADER)
    (tmp_path / "notes.txt").write_bytes(JOURNAL_HEADER)  # not a journal's name
    host_file = tmp_path.parent / f"{tmp_path.name}-host.journal"
    host_file.write_bytes(JOURNAL_HEADER + b"host secret")
    (tmp_path / "host.journal").symlink_to(host_file)
    (tmp_path / "zero.journal").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.journal")
    with open(tmp_path / "sparse.journal", "wb") as sparse:
        sparse.truncate(1 << 40)  # no signature: left out, never read beyond 8 bytes
    (tmp_path / "plain.journal").write_bytes(b"hello, not a journal")
    deep = tmp_path / ("0" * 32)
    for _ in range(50):
        deep = deep / ("0" * 32)
    deep.mkdir(parents=True)
    (deep / "system.journal").write_bytes(JOURNAL_HEADER)
    (tmp_path / "dir.journal").mkdir()

    problems = Problems()
    started = time.monotonic()
    files = open_journal_files(tmp_path, problems, "web")
    try:
        assert time.monotonic() - started < 2
        inodes = {os.fstat(fd).st_ino for fd in files.fds}
        wanted = {"system.journal", "user-1000@abc.journal~", "escape\x1b[31m\n.journal"}
        assert inodes == {(tmp_path / n).stat().st_ino for n in wanted}
        assert len(files.signature) == 3
        # Left out, and said so, without naming the guest's files.
        [warning] = problems.warnings
        assert "6 file(s)" in warning and "\x1b" not in warning and "fifo" not in warning
        assert not problems.failed
        assert directory_signature(tmp_path) != ()
    finally:
        files.close()
        host_file.unlink()


def test_a_missing_directory_has_no_files(tmp_path: Path) -> None:
    files = open_journal_files(tmp_path / "never-booted", Problems(), "web")
    assert files.fds == ()
    assert directory_signature(tmp_path / "never-booted") == ()


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "system.journal").write_bytes(JOURNAL_HEADER)
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(OSError):
        open_journal_files(tmp_path / "link", Problems(), "web")


def test_reader_bounds_its_wait_and_skips_what_is_no_entry() -> None:
    script = (
        'printf \'%s\\n\' \'{"__REALTIME_TIMESTAMP":"7","MESSAGE":"ok"}\' \'garbage\';'
        f"head -c {3 << 20} /dev/zero | tr '\\0' x; echo;"
        'printf \'%s\\n\' \'{"__REALTIME_TIMESTAMP":"8","MESSAGE":"after"}\';'
        "exec sleep 60"
    )
    reader = Reader(Source("web", Path("/x")), ["sh", "-c", script], ())
    problems = Problems()
    started = time.monotonic()
    got = [field_text(e.fields["MESSAGE"]) for e in reader.entries(idle_timeout=1.0)]
    reader.finish(problems)
    assert got == ["ok", "after"]
    assert time.monotonic() - started < 10
    assert reader.bad_lines == 2  # the garbage line and the 3 MiB one
    assert problems.failed and any("printed nothing for 1 s" in w for w in problems.warnings)


def test_reader_reports_a_failure_without_the_contents() -> None:
    reader = Reader(Source("web", Path("/x")), ["sh", "-c", "echo 'boom \x1b[2J' >&2; exit 3"], ())
    assert list(reader.entries(idle_timeout=10)) == []
    problems = Problems()
    reader.finish(problems)
    [warning] = problems.warnings
    assert "exit code 3" in warning and "\x1b" not in warning


def test_the_hosts_entries_of_a_container_console_carry_its_name() -> None:
    units = {"systemd-nspawn@web.service": "web"}
    console = entry(1, HOST, _SYSTEMD_UNIT="systemd-nspawn@web.service", MESSAGE="guest")
    assert relabel(console, units).source == "web"
    started = entry(1, HOST, _SYSTEMD_UNIT="init.scope", UNIT="systemd-nspawn@web.service")
    assert relabel(started, units).source == HOST
    # A guest's own _SYSTEMD_UNIT is its to write: it never moves an entry.
    forged = entry(1, "mallory", _SYSTEMD_UNIT="systemd-nspawn@web.service")
    assert relabel(forged, units).source == "mallory"
