"""The clients people point at an SSH server, against a container of the default image:
Ansible (ad-hoc ping, and a playbook whose second run changes nothing) and rsync, both
ways. Real tools, run on the test host as a user would run them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import CLIENT_KEY, booted_host, nspawnctl, ssh, ssh_argv
from tests.testhost import TestHost

PORT = 2801
SSH_OPTIONS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
INVENTORY = (
    f"box ansible_host=127.0.0.1 ansible_port={PORT} ansible_user=root"
    f" ansible_ssh_private_key_file={CLIENT_KEY} ansible_python_interpreter=/usr/bin/python3"
    f" ansible_ssh_common_args='{SSH_OPTIONS}'\n"
)
PLAYBOOK = """\
- hosts: all
  tasks:
    - name: a file of its own
      ansible.builtin.copy: {dest: /root/hello, content: "hello\\n", mode: "0644"}
    - name: a line in a file the image has
      ansible.builtin.lineinfile: {path: /etc/motd, line: managed by ansible, create: true}
"""
# ansible-core refuses to run without a UTF-8 locale.
ANSIBLE_ENV = ["env", "LC_ALL=C.UTF-8", "ANSIBLE_NOCOLOR=1", "ANSIBLE_FORCE_COLOR=0"]


def ansible_tool(name: str) -> str:
    """ansible's commands, from the environment the tests run in."""
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def host(image_cache: Path) -> Iterator[TestHost]:
    with booted_host(image_cache) as h:
        h.write_file(
            "/etc/nspawnctl/box.yaml",
            f"ssh: {{listen: {PORT}, authorized_keys: [{CLIENT_KEY}.pub]}}\n",
        )
        nspawnctl(h, "add", "box")
        h.write_file("/root/inventory", INVENTORY)
        h.write_file("/root/play.yml", PLAYBOOK)
        yield h


def test_ansible_ping_and_a_playbook_that_changes_nothing_the_second_time(
    host: TestHost,
) -> None:
    ping = host.run(
        [*ANSIBLE_ENV, ansible_tool("ansible"), "all", "-i", "/root/inventory", "-m", "ping"],
        timeout=180,
    )
    assert '"ping": "pong"' in ping.stdout
    argv = [*ANSIBLE_ENV, ansible_tool("ansible-playbook"), "-i", "/root/inventory"]
    first = host.run([*argv, "/root/play.yml"], timeout=180).stdout
    assert "changed=2" in first and "failed=0" in first, first
    second = host.run([*argv, "/root/play.yml"], timeout=180).stdout
    assert "changed=0" in second and "failed=0" in second, second
    assert ssh(host, PORT, "cat /root/hello").stdout == "hello\n"


def test_rsync_both_ways(host: TestHost) -> None:
    host.run(
        [
            "sh",
            "-c",
            "mkdir -p /root/src/sub && head -c 300000 /dev/urandom > /root/src/sub/blob"
            " && echo text > /root/src/file && ln -s file /root/src/link",
        ]
    )
    remote_shell = f"ssh -p {PORT} -i {CLIENT_KEY} {SSH_OPTIONS}"
    rsync = ["rsync", "-a", "--delete", "-e", remote_shell]
    host.run([*rsync, "/root/src/", "root@127.0.0.1:/root/dst/"])
    host.run([*rsync, "root@127.0.0.1:/root/dst/", "/root/back/"])
    same = host.run(["diff", "-r", "--no-dereference", "/root/src", "/root/back"], check=False)
    assert same.returncode == 0, same.stdout
    assert ssh(host, PORT, "readlink /root/dst/link").stdout.strip() == "file"


def test_a_banner_of_the_yaml_is_shown_before_the_login(host: TestHost) -> None:
    """ssh.banner: none by default, then the YAML's lines, as OpenSSH's client shows a
    pre-authentication banner (at LogLevel INFO, its default)."""
    argv = ssh_argv(PORT, "true")
    argv[argv.index("LogLevel=ERROR")] = "LogLevel=INFO"
    assert "authorized use only" not in host.run(argv, timeout=120).stderr
    host.write_file(
        "/etc/nspawnctl/box.yaml",
        f"ssh:\n  listen: {PORT}\n  authorized_keys: [{CLIENT_KEY}.pub]\n"
        "  banner: |\n    box: authorized use only.\n    Second line.\n",
    )
    nspawnctl(host, "apply")
    shown = host.run(argv, timeout=120).stderr
    assert "box: authorized use only.\nSecond line.\n" in shown, shown
