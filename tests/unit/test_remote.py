"""-H's command line: destinations, what the far side is given, and the file arguments
that travel with the call (the ssh part is tested on real hosts: test_remote.py)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from nspawnctl import remote, ssh
from nspawnctl.cli import build_parser
from nspawnctl.errors import UsageError
from nspawnctl.ssh import Destination, Sent, far_said


@pytest.mark.parametrize(
    ("text", "host", "user", "port"),
    [
        ("web1", "web1", None, None),
        ("root@web1", "web1", "root", None),
        ("admin@10.0.0.2:2222", "10.0.0.2", "admin", 2222),
        ("fd00::2", "fd00::2", None, None),
        ("[fd00::2]:2222", "fd00::2", None, 2222),
        ("me@[fd00::2]", "fd00::2", "me", None),
    ],
)
def test_destinations(text: str, host: str, user: str | None, port: int | None) -> None:
    destination = Destination.parse(text)
    assert (destination.host, destination.user, destination.port) == (host, user, port)
    assert Destination.parse(str(destination)) == destination


@pytest.mark.parametrize(
    "text",
    ["", "-oProxyCommand=touch /tmp/x", "web1:0", "web1:99999", "web1:ssh", "a b", "[::1", "@web1"],
)
def test_bad_destinations_are_refused_before_ssh_sees_them(text: str) -> None:
    with pytest.raises(UsageError, match=r"not \[USER@\]HOST\[:PORT\]"):
        Destination.parse(text)


@pytest.mark.parametrize(
    ("argv", "far"),
    [
        (["-H", "h", "list"], ["list"]),
        (["-Hh", "--debug", "list", "--json"], ["--debug", "list", "--json"]),
        (
            ["--host=h", "--config-dir", "/etc/x", "-H", "g", "status", "web"],
            ["--config-dir", "/etc/x", "status", "web"],
        ),
        # After the verb, -H is the verb's business (exec's command line, say).
        (["-H", "h", "exec", "web", "--", "ls", "-H", "x"], ["exec", "web", "--", "ls", "-H", "x"]),
    ],
)
def test_the_far_side_gets_the_command_line_without_its_hosts(
    argv: list[str], far: list[str]
) -> None:
    assert remote.verb_argv(argv) == far


def _roundtrip(argv: list[str], where: str) -> tuple[list[Sent], argparse.Namespace]:
    """The client's view of argv's files, then what the far side reads them as."""
    parser = build_parser()
    args = parser.parse_args(argv)
    files = remote._local_files(parser, args)
    sent = {str(f.local): f"{where}/{f.remote}" for f in files}
    far = parser.parse_args(["--client-files", json.dumps(sent), *remote.verb_argv(argv)])
    remote.receive(parser, far)
    return files, far


def test_files_named_on_the_command_line_travel_and_nothing_else(tmp_path: Path) -> None:
    yaml = tmp_path / "web.yaml"
    yaml.write_text("image: debian:bookworm\n")
    key = tmp_path / "me.pub"
    key.write_text("ssh-ed25519 AAAA me\n")
    line = "ssh-ed25519 BBBB other"
    argv = ["-H", "h", "add", "web", "-f", str(yaml)]
    files, far = _roundtrip(argv, "/var/tmp/d")
    assert [(f.local, f.role) for f in files] == [(yaml, "input")]
    assert far.file == Path("/var/tmp/d/0.yaml") and far.name == "web"

    files, far = _roundtrip(["-H", "h", "add", "web", "--key", str(key), "--key", line], "/d")
    assert [f.local for f in files] == [key]
    assert far.key == ["/d/0.pub", line]


def test_an_export_is_an_output_and_its_name_may_equal_the_containers(tmp_path: Path) -> None:
    out = tmp_path / "web"
    files, far = _roundtrip(["-H", "h", "export", "web", str(out)], "/d")
    assert [(f.local, f.role, f.remote) for f in files] == [(out, "output", "0")]
    assert far.name == "web" and far.file == Path("/d/0")

    files, far = _roundtrip(["-H", "h", "image", "export", "debian:bookworm", "x.tar.zst"], "/d")
    assert [(f.remote, f.role) for f in files] == [("0.tar.zst", "output")]


def test_a_missing_local_input_is_an_error_before_any_connection(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["-H", "h", "import", str(tmp_path / "nope.tar")])
    with pytest.raises(UsageError, match="no such file here"):
        remote._local_files(parser, args)


def test_only_list_and_status_take_several_hosts() -> None:
    parser = build_parser()
    args = parser.parse_args(["-H", "a", "-H", "b", "stop", "web"])
    with pytest.raises(UsageError, match="takes one -H"):
        remote.run(parser, args, ["-H", "a", "-H", "b", "stop", "web"])


@pytest.mark.parametrize(
    ("stderr", "said", "hint"),
    [
        (
            b"nspawnctl: warning: x\nnspawnctl: error: no container 'web'\nhint: see `list`\n",
            "no container 'web'",
            "see `list`",
        ),
        (b"sudo: a terminal is required to read the password\n", "sudo: a terminal is", None),
        (b"", "exit code 3", None),
    ],
)
def test_the_far_error_is_nspawnctls_own_line_else_the_last(
    stderr: bytes, said: str, hint: str | None
) -> None:
    done = subprocess.CompletedProcess(["ssh"], 3, b"", stderr)
    found, found_hint = far_said(done)
    assert found.startswith(said) and found_hint == hint


def test_apply_sends_its_directory_as_read_here_links_followed(tmp_path: Path) -> None:
    """`-H apply DIR`: DIR's YAML may be links to shared files; what goes is the file
    (an image's tree, an input, keeps its links as links)."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared/web.yaml").write_text("image: debian:bookworm\n")
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet/web.yaml").symlink_to("../shared/web.yaml")
    args = build_parser().parse_args(["-H", "h", "apply", str(tmp_path / "fleet")])
    [sent] = remote._local_files(build_parser(), args)
    assert sent.follow
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        ssh._add(tar, sent)
        ssh._add(tar, Sent(tmp_path / "fleet", "1", "input"))
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["0/web.yaml"].isfile() and members["0/web.yaml"].size == 23
    assert members["1/web.yaml"].issym()
