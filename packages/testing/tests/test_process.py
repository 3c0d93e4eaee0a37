"""free_port: ports the kernel never hands out by itself, never twice, never one in use."""

from __future__ import annotations

import socket

from otterscale.testing import free_port
from otterscale.testing._process import _POOL_MIN, _POOL_START, _ephemeral_range


def test_ports_come_from_below_the_ephemeral_range_and_never_repeat() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    low = _ephemeral_range()[0]
    if low - _POOL_START >= _POOL_MIN:  # else the kernel's choice is used (documented)
        assert all(_POOL_START <= port < low for port in ports), ports
    for port in ports[:20]:
        with socket.socket() as server:  # each is really free, as the server will bind it
            server.bind(("127.0.0.1", port))
            server.listen()


def test_a_port_someone_holds_is_skipped() -> None:
    first = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", first + 1))  # the next candidate of the walk
        holder.listen()
        assert free_port() != first + 1


def test_a_port_held_on_another_loopback_address_is_skipped() -> None:
    first = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.12", first + 1))  # e.g. a hub replica's "Pod IP"
        holder.listen()
        assert free_port("127.0.0.11") != first + 1
