"""Unit tests of the hub's in-memory state: tunnel events, probes, the token cache, errors."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import (
    AuthenticationError,
    ChiselServerEvent,
    Identity,
    IdentityProviderUnavailableError,
    ServerEventKind,
    VerifiedToken,
    parse_server_line,
)
from otterscale.hub._auth import Authenticator
from otterscale.hub._errors import UnknownClusterError, to_connect_error
from otterscale.hub._metrics import HubMetrics
from otterscale.hub._tunnels import Tunnels


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tunnels(clock: Clock) -> Tunnels:
    opened: list[str] = []
    found = Tunnels(
        {"alpha": (51001, "alpha-agent"), "beta": (51002, "beta-agent")},
        HubMetrics(["alpha", "beta"]),
        on_tunnel_open=opened.append,
        clock=clock,
    )
    found.opened = opened  # type: ignore[attr-defined]
    return found


def feed(tunnels: Tunnels, *lines: str) -> None:
    for line in lines:
        event = parse_server_line(line)
        assert event is not None, line
        tunnels.handle_event(event)


OPEN = (
    "2026/11/27 19:53:36 server: session#2: Open (user=alpha-agent addr=10.0.0.5:49576 "
    "remotes=R:127.0.0.1:51001:127.0.0.1:8299)",
    "2026/11/27 19:53:36 server: session#2: tun: proxy#R:127.0.0.1:51001=>8299: Listening",
)


def test_tunnel_open_and_close(tunnels: Tunnels, clock: Clock) -> None:
    started = tunnels.get("alpha")
    assert started is not None
    assert not started.connected
    assert started.since == clock.now
    # TUNNEL_OPEN carries the session's user and address only through ChiselServer; here the
    # raw event has the port, which is what routing needs.
    clock.now += 5
    tunnels.handle_event(
        ChiselServerEvent(
            ServerEventKind.TUNNEL_OPEN, session=2, user="alpha-agent", address="10.0.0.5:1", ports=(51001,)
        )
    )
    status = tunnels.get("alpha")
    assert status is not None
    assert status.connected
    assert status.since == clock.now
    assert status.agent_address == "10.0.0.5:1"
    assert status.last_seen == clock.now
    assert tunnels.opened == ["alpha"]  # type: ignore[attr-defined]
    # A close of another session does not touch it.
    tunnels.handle_event(ChiselServerEvent(ServerEventKind.SESSION_CLOSED, session=1, ports=(51001,)))
    assert tunnels.get("alpha").connected  # type: ignore[union-attr]
    clock.now += 5
    tunnels.handle_event(
        ChiselServerEvent(ServerEventKind.SESSION_CLOSED, session=2, ports=(51001,), detail="5s")
    )
    status = tunnels.get("alpha")
    assert status is not None
    assert not status.connected
    assert status.since == clock.now
    assert status.last_error == "the agent's tunnel closed (it was open for 5s)"
    assert status.last_error_at == clock.now


def test_server_exit_disconnects_everyone(tunnels: Tunnels) -> None:
    feed(tunnels, "server: Listening on http://0.0.0.0:8300")
    assert tunnels.server_up
    tunnels.handle_event(ChiselServerEvent(ServerEventKind.TUNNEL_OPEN, session=1, ports=(51001,)))
    tunnels.handle_event(ChiselServerEvent(ServerEventKind.EXITED, detail="killed by signal 9"))
    assert not tunnels.server_up
    status = tunnels.get("alpha")
    assert status is not None
    assert not status.connected
    assert "killed by signal 9" in (status.last_error or "")


def test_refusals_are_recorded_per_cluster(tunnels: Tunnels) -> None:
    feed(
        tunnels,
        'server: Login failed for user "beta-agent" (10.0.0.9:5555)',
        "server: session#3: Failed: server: access to 'R:127.0.0.1:51001' denied",
    )
    beta = tunnels.get("beta")
    alpha = tunnels.get("alpha")
    assert beta is not None
    assert alpha is not None
    assert "tunnel login refused for user 'beta-agent' from 10.0.0.9:5555" in (beta.last_error or "")
    assert "another cluster's agent user" in (alpha.last_error or "")
    feed(tunnels, "server: session#4: Failed: server: Server cannot listen on R:127.0.0.1:51002=>8299")
    assert "busy" in (tunnels.get("beta").last_error or "")  # type: ignore[union-attr]


def test_probes(tunnels: Tunnels, clock: Clock) -> None:
    tunnels.handle_event(ChiselServerEvent(ServerEventKind.TUNNEL_OPEN, session=1, ports=(51001,)))
    tunnels.probe_failed("alpha", "timeout")
    assert tunnels.get("alpha").connected  # type: ignore[union-attr]  # one failure is tolerated
    tunnels.probe_failed("alpha", "timeout")
    status = tunnels.get("alpha")
    assert status is not None
    assert not status.connected
    assert "does not answer: timeout" in (status.last_error or "")
    clock.now += 1
    tunnels.probe_ok("alpha", 0.002)
    status = tunnels.get("alpha")
    assert status is not None
    assert status.connected
    assert status.round_trip == 0.002
    assert status.last_seen == clock.now
    # A probe that reaches beta although chisel never reported its tunnel (a missed log line).
    tunnels.probe_ok("beta", 0.001)
    assert tunnels.get("beta").connected  # type: ignore[union-attr]
    # Probe failures on a closed tunnel change nothing.
    tunnels.handle_event(
        ChiselServerEvent(ServerEventKind.SESSION_CLOSED, session=1, ports=(51001,), detail="1s")
    )
    tunnels.probe_failed("alpha", "refused")
    assert "tunnel closed" in (tunnels.get("alpha").last_error or "")  # type: ignore[union-attr]


async def test_wait_changed(tunnels: Tunnels) -> None:
    import asyncio

    waiter = asyncio.create_task(tunnels.wait_changed())
    await asyncio.sleep(0)
    assert not waiter.done()
    tunnels.handle_event(ChiselServerEvent(ServerEventKind.TUNNEL_OPEN, session=1, ports=(51001,)))
    await asyncio.wait_for(waiter, 1)


class FakeVerifier:
    def __init__(self) -> None:
        self.calls = 0
        self.error: Exception | None = None

    async def verify_token(self, token: str) -> VerifiedToken:
        """As the real verifier: the identity and the numeric ``exp`` (else unauthenticated)."""
        self.calls += 1
        if self.error is not None:
            raise self.error
        payload = token.split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("exp")
        if not isinstance(exp, int | float):
            raise AuthenticationError("token claim exp must be a number (seconds since the epoch)")
        return VerifiedToken(Identity(subject=token.split(".")[0] or "x"), float(exp))

    async def aclose(self) -> None:
        return None


def _token(subject: str, exp: object) -> str:
    claims: dict[str, Any] = {"sub": subject}
    if exp is not None:
        claims["exp"] = exp
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{subject}.{body}.sig"


async def test_token_cache(clock: Clock) -> None:
    verifier = FakeVerifier()
    auth = Authenticator(verifier, cache_seconds=60, cache_size=2, clock=clock)  # type: ignore[arg-type]
    token = _token("alice", clock.now + 300)
    for _ in range(3):
        assert (await auth.authenticate([f"Bearer {token}"])).subject == "alice"
    assert verifier.calls == 1
    clock.now += 61  # past the cache window: verified again
    await auth.authenticate([f"bearer {token}"])
    assert verifier.calls == 2
    # Never cached past the token's own exp.
    short = _token("bob", clock.now + 5)
    await auth.authenticate([f"Bearer {short}"])
    clock.now += 6
    await auth.authenticate([f"Bearer {short}"])
    assert verifier.calls == 4
    # Failures are not cached.
    verifier.error = AuthenticationError("token has expired")
    bad = _token("carol", clock.now + 300)
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            await auth.authenticate([f"Bearer {bad}"])
    assert verifier.calls == 6
    # Bounded.
    verifier.error = None
    for name in ("d", "e", "f"):
        await auth.authenticate([f"Bearer {_token(name, clock.now + 300)}"])
    assert len(auth._cache) == 2


async def test_the_cache_trusts_only_the_verified_expiry(clock: Clock) -> None:
    """The expiry comes from the verifier (which insists on a number), never from re-reading the
    token: a string ``exp`` once made the cache ignore it, and a token worked past its expiry."""
    verifier = FakeVerifier()
    auth = Authenticator(verifier, cache_seconds=60, clock=clock)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError, match="exp must be a number"):
        await auth.authenticate([f"Bearer {_token('mallory', str(clock.now + 3600))}"])
    assert not auth._cache
    token = _token("alice", clock.now + 5)
    await auth.authenticate([f"Bearer {token}"])
    clock.now += 6  # past exp, inside the cache window: verified again, not served from the cache
    await auth.authenticate([f"Bearer {token}"])
    assert verifier.calls == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "missing credentials"),
        (["Bearer a.b.c", "Bearer d.e.f"], "more than one"),
        (["Token abc"], "Bearer scheme"),
        (["Bearer   "], "empty bearer token"),
    ],
)
async def test_header_problems(values: list[str], message: str) -> None:
    auth = Authenticator(FakeVerifier())  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError, match=message):
        await auth.authenticate(values)


def test_to_connect_error() -> None:
    assert to_connect_error(UnknownClusterError("x")).code is Code.NOT_FOUND
    assert to_connect_error(AuthenticationError("x")).code is Code.UNAUTHENTICATED
    assert to_connect_error(IdentityProviderUnavailableError("x")).code is Code.UNAVAILABLE
    original = ConnectError(Code.ABORTED, "conflict")
    assert to_connect_error(original) is original
    hidden = to_connect_error(RuntimeError("secret internals"), request_id="r1")
    assert hidden.code is Code.INTERNAL
    assert "secret" not in hidden.message
    assert "r1" in hidden.message


def test_a_denied_remote_on_another_host_is_not_blamed_on_another_cluster(tunnels: Tunnels) -> None:
    feed(tunnels, "server: session#5: Failed: server: access to 'R:0.0.0.0:51001' denied")
    alpha = tunnels.get("alpha")
    assert alpha is not None
    assert "another cluster" not in (alpha.last_error or "")
    assert "may only ask for R:127.0.0.1:51001" in (alpha.last_error or "")
