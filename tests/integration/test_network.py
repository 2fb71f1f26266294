"""Networking and services on real systemd: a guest service that is not socket-aware
(nginx) reached through a host socket that boots the container, a guest unit taking
its socket natively, private networks, clashes refused, a static address on a veth."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nspawnctl.recipe import parse_image, with_bootstrap
from nspawnctl.store import ImageStore
from tests.integration.conftest import (
    CLIENT_KEY,
    booted_host,
    fresh,
    nspawnctl,
    squatter,
    ssh,
    ssh_argv,
)
from tests.testhost import TestHost

WEB = f"""\
image: debian:bookworm
bootstrap: {{packages: [nginx]}}
ssh: {{listen: 2222, authorized_keys: [{CLIENT_KEY}.pub]}}
sockets:
  - {{listen: 8080, to: 80, service: nginx.service}}
  - {{listen: 2022, native: echo.socket}}
"""

VNET = f"""\
image: debian:bookworm
bootstrap: {{packages: [nginx]}}
ssh: {{listen: 2224, authorized_keys: [{CLIENT_KEY}.pub]}}
network: {{mode: veth, address: 10.77.0.2/24}}
"""

# N clients at once, each an HTTP GET; prints the status of every one.
CLIENTS = """
import sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
def get(_):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=60) as r:
            return str(r.status)
    except Exception as e:
        return type(e).__name__
with ThreadPoolExecutor(int(sys.argv[2])) as pool:
    print(" ".join(pool.map(get, range(int(sys.argv[2])))))
"""


@pytest.fixture(scope="module")
def nginx_image(image_cache: Path) -> Path:
    recipe = with_bootstrap(parse_image("debian:bookworm"), packages=("nginx",))
    fresh(ImageStore(image_cache), recipe)
    return image_cache


@pytest.fixture(scope="module")
def host(nginx_image: Path) -> Iterator[TestHost]:
    with booted_host(nginx_image) as h:
        h.write_file("/etc/nspawnctl/web.yaml", WEB)
        nspawnctl(h, "add", "web")
        yield h


def running(host: TestHost, name: str) -> bool:
    out = host.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    return any(line.split()[:1] == [name] for line in out.splitlines())


def stop(host: TestHost, name: str) -> None:
    nspawnctl(host, "stop", name)
    host.wait_for(lambda: not running(host, name), timeout=60, what=f"{name} stopped")


def test_http_to_a_stopped_container_boots_it_and_reaches_nginx(host: TestHost) -> None:
    assert not running(host, "web")
    page = host.run(["curl", "-sS", "--max-time", "60", "http://127.0.0.1:8080/"]).stdout
    assert "Welcome to nginx" in page
    assert running(host, "web")
    assert ssh(host, 2222, "hostname").stdout.strip() == "web"


ECHO_UNITS = (
    "printf '[Socket]\\nListenStream=7\\nAccept=yes\\n' > /etc/systemd/system/echo.socket && "
    "printf '[Service]\\nExecStart=/bin/cat\\nStandardInput=socket\\n' "
    "> /etc/systemd/system/echo@.service"
)
ECHO_CLIENT = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60) as s:
    s.sendall(b"hello\\n")
    print(s.recv(100).decode().strip())
"""


def test_native_socket_unit_takes_its_socket(host: TestHost) -> None:
    """A guest unit that takes its socket itself (here an Accept=yes echo service on
    port 7): nspawnctl rewrites its address to the host socket's in a drop-in."""
    nspawnctl(host, "exec", "web", "--", "sh", "-c", ECHO_UNITS)
    stop(host, "web")
    out = host.run([sys.executable, "-c", ECHO_CLIENT, "2022"]).stdout
    assert out.strip() == "hello"


def test_localhost_and_its_own_name_resolve_and_ssh_forwards_to_localhost(
    host: TestHost,
) -> None:
    assert ssh(host, 2222, "hostname -f").stdout.strip() == "web"
    assert "localhost" in ssh(host, 2222, "getent hosts localhost").stdout
    # What `ssh -L 8000:localhost:8000` asks of the guest's sshd, on standard input and
    # output: a connection to localhost, here to an echo service of the guest's.
    ssh(
        host,
        2222,
        "systemd-run --unit=echo9000 systemd-socket-activate -l 127.0.0.1:9000 -a --inetd /bin/cat",
    )
    argv = ssh_argv(2222, "")
    out = host.run([*argv[:-2], "-W", "localhost:9000", argv[-2]], input="hello\n").stdout
    assert out == "hello\n"


def test_private_network_has_only_loopback(host: TestHost) -> None:
    links = ssh(host, 2222, "ip -o link show | cut -d: -f2").stdout.split()
    assert links == ["lo"]


def test_second_container_on_the_same_port_is_refused(host: TestHost) -> None:
    host.write_file("/etc/nspawnctl/web2.yaml", WEB.replace("2222", "2223").replace("2022", "2023"))
    result = nspawnctl(host, "add", "web2", check=False)
    host.run(["rm", "/etc/nspawnctl/web2.yaml"])
    assert result.returncode == 2
    assert "port 8080 is already used by container 'web'" in result.stderr
    assert (
        host.run(
            ["test", "-e", "/etc/systemd/system/nspawnctl-web2.socket"], check=False
        ).returncode
        == 1
    )


def test_port_held_by_a_host_program_is_refused(host: TestHost) -> None:
    """Held on one IPv4 address only: it still clashes with a container's port, which
    listens on every address."""
    with squatter(host, "AF_INET", "127.0.0.1", 8090):
        result = nspawnctl(
            host, "add", "web3", "--ssh", "8090", "--key", f"{CLIENT_KEY}.pub", check=False
        )
    assert result.returncode == 2
    assert "port 8090/tcp is already in use on the host by python3" in result.stderr


def test_fifty_connections_to_a_stopped_container_are_all_served(host: TestHost) -> None:
    stop(host, "web")
    out = host.run([sys.executable, "-c", CLIENTS, "http://127.0.0.1:8080/", "50"]).stdout
    assert out.split() == ["200"] * 50


def test_static_address_on_a_veth(host: TestHost) -> None:
    host.run(["systemctl", "start", "systemd-networkd"])
    host.write_file("/etc/nspawnctl/vnet.yaml", VNET)
    nspawnctl(host, "add", "vnet")
    nspawnctl(host, "start", "vnet")
    # nginx listens in the container's own namespace, on its own address.
    host.wait_for(
        lambda: (
            "Welcome to nginx"
            in host.run(["curl", "-sS", "--max-time", "2", "http://10.77.0.2/"], check=False).stdout
        ),
        timeout=60,
        what="nginx answering on 10.77.0.2",
    )
    status = nspawnctl(host, "status", "vnet").stdout
    assert "veth, address 10.77.0.2/24" in status
    assert "10.77.0.2" in nspawnctl(host, "list").stdout
