"""BlackHoleRelay: relays both ways; frozen links carry nothing and stay open; new links pass
(unless later ones are frozen too)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from otterscale.testing import BlackHoleRelay


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A loopback TCP echo server (one thread per connection)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stopping = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield ("127.0.0.1", int(server.getsockname()[1]))
    stopping.set()
    server.close()
    acceptor.join(timeout=5)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(len(data))


def test_bytes_pass_both_ways(echo_server: tuple[str, int]) -> None:
    with BlackHoleRelay(echo_server) as relay, socket.create_connection(("127.0.0.1", relay.port)) as conn:
        assert relay.url == f"http://127.0.0.1:{relay.port}"
        assert roundtrip(conn, b"hello") == b"hello"
        assert relay.accepted == 1


def test_a_frozen_link_carries_nothing_stays_open_and_new_links_pass(echo_server: tuple[str, int]) -> None:
    with BlackHoleRelay(echo_server) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as old:
            assert roundtrip(old, b"before") == b"before"
            assert relay.freeze() == 1
            old.settimeout(0.3)
            old.sendall(b"lost?")
            with pytest.raises(TimeoutError):  # no answer, and no FIN or RST either
                old.recv(16)
            assert relay.frozen_connections == 1
            with socket.create_connection(("127.0.0.1", relay.port)) as new:
                assert roundtrip(new, b"after") == b"after"
            relay.thaw()
            old.settimeout(5)
            assert old.recv(16) == b"lost?"  # held back, not dropped: the stream stays intact
        assert relay.accepted == 2


def test_freezing_later_links_too_holds_new_connections_until_thawed(echo_server: tuple[str, int]) -> None:
    with BlackHoleRelay(echo_server) as relay, socket.create_connection(("127.0.0.1", relay.port)) as old:
        assert roundtrip(old, b"before") == b"before"
        assert relay.freeze(later=True) == 1
        with socket.create_connection(("127.0.0.1", relay.port)) as new:
            new.settimeout(0.3)
            new.sendall(b"held")
            with pytest.raises(TimeoutError):  # accepted, never answered
                new.recv(16)
            relay.thaw()
            new.settimeout(5)
            assert new.recv(16) == b"held"
        with socket.create_connection(("127.0.0.1", relay.port)) as after:
            assert roundtrip(after, b"thawed") == b"thawed"


def test_close_ends_every_link(echo_server: tuple[str, int]) -> None:
    relay = BlackHoleRelay(echo_server).start()
    conn = socket.create_connection(("127.0.0.1", relay.port))
    assert roundtrip(conn, b"x") == b"x"
    relay.freeze()
    relay.close()
    conn.settimeout(5)
    assert conn.recv(16) == b""  # the client sees the close
    conn.close()
    assert relay.open_connections == 0
    relay.close()  # idempotent
