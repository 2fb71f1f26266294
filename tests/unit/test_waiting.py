"""Connections to a listening socket, open and waiting in its queue, read from the
kernel's own table, with real sockets of this machine."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from nspawnctl.listen import Listen
from nspawnctl.tcp import TcpTable


def listening(family: socket.AddressFamily, address: str) -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((address, 0))
    server.listen(8)
    return server


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for client in made:
        client.close()


def test_every_address_counts_what_nobody_took(clients: list[socket.socket]) -> None:
    with listening(socket.AF_INET6, "::") as server:
        port = server.getsockname()[1]
        clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert waiting_connections(Listen(port)) == 3
        server.accept()[0].close()
        assert waiting_connections(Listen(port)) == 2


def test_an_address_counts_only_its_own_socket(clients: list[socket.socket]) -> None:
    with listening(socket.AF_INET, "127.0.0.1") as server:
        port = server.getsockname()[1]
        clients.append(socket.create_connection(("127.0.0.1", port)))
        assert waiting_connections(Listen.parse(f"127.0.0.1:{port}")) == 1
        assert waiting_connections(Listen(port)) == 0  # not the `::` socket of that port
        assert waiting_connections(Listen(port, protocol="udp")) == 0


def waiting_connections(listen: Listen) -> int:
    return TcpTable.read().waiting_on(listen)


def test_open_connections_count_the_served_and_the_waiting(clients: list[socket.socket]) -> None:
    with listening(socket.AF_INET6, "::") as server:
        port = server.getsockname()[1]
        clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        served, _peer = server.accept()
        with served:
            table = TcpTable.read()
            # The accepted one and the two in the queue; not the clients' own ends.
            assert table.connections(Listen(port)) == 3
            assert table.connections(Listen.parse(f"127.0.0.1:{port}")) == 3
            assert table.connections(Listen.parse(f"127.0.0.2:{port}")) == 0
            assert table.waiting_on(Listen(port)) == 2
        clients.pop().close()
        assert TcpTable.read().connections(Listen(port)) == 1  # closed ones are not open
