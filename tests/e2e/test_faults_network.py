"""The tunnel cut while the agent lives: its chisel client SIGKILLed, or its link black-holed.

The black hole is a :class:`~otterscale.testing.BlackHoleRelay` between the agent's chisel client
and the hub's chisel server (the agent's ``--tunnel-server-url`` points at it): frozen, it stops
forwarding both ways and keeps both sockets open, so no FIN or RST tells anyone; only the hub's
``/ping`` prober and chisel's SSH keepalives (10 s, on both ends) can notice. New connections
through the relay pass, so the agent's chisel can reconnect once it gives up on the dead one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.testing import BlackHoleRelay, System

from .conftest import Hub, Measurements, unique
from .test_faults import (
    FAST_FAIL,
    Writer,
    assert_clean_error,
    assert_saw_exactly_what_was_written,
    call_code,
    child_pids,
    list_configmaps,
    start_watching_writes,
    until,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.faults,
    pytest.mark.skipif(
        "config.getoption('--provider') == 'kind'",
        reason="local provider only (--provider=kind): relays and kills OS processes on this host",
    ),
]

#: The hub must call a black-holed cluster unavailable within this many seconds: its prober pings
#: every 5 s with a 2 s timeout and gives up after two failures (<= 5 + 2 + 5 + 2 = 14 s), and the
#: chisel server's own keepalive (10 s ping, 10 s timeout) drops the session within ~20 s.
BLACK_HOLE_DETECTED_WITHIN = 25.0
#: ... and the agent's chisel must give up on the dead link and be back through a new connection
#: within this many seconds of the freeze (keepalive 10 s + ping timeout 10 s + retry <= 2 s).
BLACK_HOLE_RECOVERED_WITHIN = 45.0
#: A call in flight when the link froze must end (not hang for the client's whole deadline).
IN_FLIGHT_ENDS_WITHIN = 30.0


async def test_a_black_holed_tunnel_is_unavailable_fast_and_the_agent_reconnects(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    system = otterscale_system
    client = hub.client("connect-h2c", timeout_ms=60_000)
    auth = hub.auth("bob")
    hub_pid = system.hub.pid if system.hub else None
    relay = BlackHoleRelay(("127.0.0.1", system.tunnel_port)).start()
    in_flight: asyncio.Task[Any] | None = None
    try:
        system.stop_agent("west")
        agent = system.start_agent("west", tunnel_server_url=relay.url)
        assert relay.open_connections >= 1
        assert await call_code(client.list(list_configmaps("west", namespace), headers=auth)) is None

        frozen = relay.freeze()
        froze = time.monotonic()
        assert frozen >= 1
        # A call sent into the black hole right away: it must end, unavailable, not hang.
        in_flight_ended: list[float] = []

        async def call_into_the_hole() -> Any:
            try:
                return await client.list(list_configmaps("west", namespace), headers=auth)
            finally:
                in_flight_ended.append(time.monotonic() - froze)

        in_flight = asyncio.create_task(call_into_the_hole())

        async def hub_says_unavailable() -> bool:
            return system.connected().get("west") is False

        await until(
            hub_says_unavailable, BLACK_HOLE_DETECTED_WITHIN, "the hub marking west disconnected", every=0.1
        )
        detected = time.monotonic() - froze
        # From then on a call fails at once, saying which cluster, with unavailable.
        started = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            await client.list(list_configmaps("west", namespace), headers=auth)
        fast_fail = time.monotonic() - started
        assert_clean_error(caught.value)
        assert "west" in caught.value.message
        assert fast_fail < FAST_FAIL
        assert await call_code(client.list(list_configmaps("east"), headers=hub.auth("alice"))) is None

        with pytest.raises(ConnectError) as in_flight_error:
            await asyncio.wait_for(in_flight, IN_FLIGHT_ENDS_WITHIN)
        assert_clean_error(in_flight_error.value)

        async def back() -> bool:
            return await call_code(client.list(list_configmaps("west", namespace), headers=auth)) is None

        await until(back, BLACK_HOLE_RECOVERED_WITHIN, "west answering again through a new tunnel", every=0.2)
        recovered = time.monotonic() - froze
        # Recovered by a new connection through the relay, by the same agent and chisel process
        # (the agent was not restarted; its chisel client gave up on the dead link by itself).
        assert relay.accepted >= 2
        assert agent.alive()
        assert system.agents["west"] is agent
        assert system.hub is not None
        assert system.hub.pid == hub_pid
    finally:
        if in_flight is not None:
            in_flight.cancel()
            await asyncio.gather(in_flight, return_exceptions=True)
        system.stop_agent("west")
        relay.close()
        system.start_agent("west")
    measurements.record(
        "black_holed_tunnel",
        {
            "hub_marked_unavailable_after_s": round(detected, 3),
            "call_then_failed_in_s": round(fast_fail, 3),
            "in_flight_call_ended_after_s": round(in_flight_ended[0], 3),
            "in_flight_call": f"{in_flight_error.value.code}: {in_flight_error.value.message}",
            "working_again_after_s": round(recovered, 3),
            "relay_connections": relay.accepted,
        },
    )


async def test_a_watch_across_a_killed_agent_chisel_resumes_without_losing_a_write(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    """The agent's chisel client SIGKILLed under an open Watch: the Watch ends unavailable (the
    agent lives on), writes go on in kube-apiserver, and the resumed Watch sees each once."""
    system = otterscale_system
    cp = system.clusters["west"].control_plane
    assert cp is not None
    agent_pid = system.agents["west"].pid
    (chisel,) = child_pids(agent_pid, "chisel client")
    client = hub.client("grpc-h2c", timeout_ms=None)
    auth = hub.auth("bob")
    writer = Writer(cp, namespace, unique("chisel"))
    watch, task = await start_watching_writes(client, auth, "west", namespace, writer)
    try:
        killed = time.monotonic()
        os.kill(chisel, signal.SIGKILL)
        await until(lambda: bool(watch.endings_since(killed)), 10, "the watch ending")
        first = watch.endings_since(killed)[0]
        assert first.code is Code.UNAVAILABLE, first
        await until(lambda: watch.check_caught_up(writer), 30, "the resumed watch catching up")
        caught_up = time.monotonic() - killed
        writer.stop()
        await until(lambda: watch.check_caught_up(writer), 10, "the last writes seen")
    finally:
        writer.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert_saw_exactly_what_was_written(watch, writer)
    assert system.agents["west"].pid == agent_pid
    (replacement,) = child_pids(agent_pid, "chisel client")
    assert replacement != chisel
    measurements.record(
        "watch_across_agent_chisel_kill",
        {
            "watch_ended_after_s": round(first.at - killed, 3),
            "caught_up_after_s": round(caught_up, 3),
            "writes": writer.count,
            "attempts": watch.attempts,
        },
    )
