"""A test agent that serves ``otterscale.testing.echo.v1.EchoService`` behind a real chisel tunnel.

EchoService (``packages/testing/proto``) has every call shape and every kind of route, so a hub
that is told only its descriptor shows that it forwards any service without code of its own.
:class:`EchoAgent` serves it the way the real agent serves its services: connectrpc's generated
ASGI application on :func:`otterscale.common.serve` (the same tuned HTTP/1.1 + h2c server), every
call checked against the hub's signed identity headers for its cluster and procedure (all four
call shapes, not only the ones the real agent has today), ``GET /ping`` for the hub's prober, and
a real ``chisel client`` dialling the hub's tunnel server.

:class:`EchoService` records what it saw, in order (:attr:`EchoService.events`), so a test can
tell, for instance, that the agent answered a bidirectional stream's first message before the
second one arrived (full duplex end to end).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from otterscale.common import (
    ChiselBinary,
    ChiselClient,
    Identity,
    IdentityHeaderError,
    create_listener,
    serve,
    verify_identity,
)

from .echo.v1 import echo_pb2 as pb
from .echo.v1.echo_connect import EchoServiceASGIApplication

#: The EchoService descriptor: what a hub needs to forward it (``HubSettings.routed_services``).
ECHO_SERVICE = pb.DESCRIPTOR.services_by_name["EchoService"]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class EchoEvent:
    """One thing the agent saw or did: ``kind`` is ``call``, ``received`` or ``sent``."""

    kind: str
    method: str
    text: str = ""
    subject: str = ""
    headers: dict[str, list[str]] = field(default_factory=dict)


class EchoService:
    """EchoService of one cluster's test agent (behaviour: see ``echo.proto``)."""

    def __init__(self, cluster: str, key: bytes) -> None:
        self.cluster = cluster
        self._key = key
        self.events: list[EchoEvent] = []
        self.sessions: dict[str, str] = {}  # session id -> subject
        self.open_streams = 0
        #: Set whenever a stream ends on the agent (however it ends).
        self.stream_ended = asyncio.Event()

    def _verify(self, ctx: RequestContext[Any, Any]) -> Identity:
        method = f"/{ctx.method.service_name}/{ctx.method.name}"
        headers: dict[str, list[str]] = {}
        for name, value in ctx.request_headers.allitems():
            headers.setdefault(name.lower(), []).append(value)
        try:
            identity = verify_identity(
                {name: values[0] for name, values in headers.items()},
                cluster=self.cluster,
                method=method,
                key=self._key,
            )
        except IdentityHeaderError as exc:
            raise ConnectError(Code.UNAUTHENTICATED, f"hub identity rejected: {exc}") from exc
        self.events.append(EchoEvent("call", ctx.method.name, subject=identity.subject, headers=headers))
        return identity

    def _origin(self, identity: Identity) -> Any:
        return pb.Origin(cluster=self.cluster, subject=identity.subject)

    def calls(self, method: str) -> list[EchoEvent]:
        """The calls of ``method`` that reached this agent (signature verified)."""
        return [event for event in self.events if event.kind == "call" and event.method == method]

    async def say(self, request: Any, ctx: RequestContext[Any, Any]) -> Any:
        identity = self._verify(ctx)
        kind, _, argument = request.text.partition(":")
        if kind == "fail":
            raise ConnectError(Code(argument), f"asked to fail with {argument}")
        if kind == "sleep":
            await asyncio.sleep(float(argument))
        session = f"{self.cluster}.{secrets.token_urlsafe(16)}"
        self.sessions[session] = identity.subject
        return pb.SayResponse(text=request.text, origin=self._origin(identity), session_id=session)

    async def count(self, request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        identity = self._verify(ctx)
        self.open_streams += 1
        self.stream_ended.clear()
        try:
            for index in range(request.count):
                yield pb.CountResponse(index=index, origin=self._origin(identity))
            if request.hold:
                await asyncio.Event().wait()
        finally:
            self.open_streams -= 1
            self.stream_ended.set()

    async def collect(self, requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]) -> Any:
        identity = self._verify(ctx)
        texts: list[str] = []
        async for request in requests:
            if request.WhichOneof("kind") == "text":
                self.events.append(EchoEvent("received", "Collect", request.text))
                texts.append(request.text)
        return pb.CollectResponse(texts=texts, origin=self._origin(identity))

    async def chat(self, requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        identity = self._verify(ctx)
        self.open_streams += 1
        self.stream_ended.clear()
        try:
            async for request in requests:
                text = "started" if request.WhichOneof("kind") == "start" else request.text
                self.events.append(EchoEvent("received", "Chat", text))
                if text == "end":
                    return
                self.events.append(EchoEvent("sent", "Chat", text))
                yield pb.ChatResponse(text=text, origin=self._origin(identity))
        finally:
            self.open_streams -= 1
            self.stream_ended.set()

    async def write(self, request: Any, ctx: RequestContext[Any, Any]) -> Any:
        identity = self._verify(ctx)
        owner = self.sessions.get(request.session_id)
        if owner is None or not secrets.compare_digest(owner, identity.subject):
            raise ConnectError(Code.NOT_FOUND, "no such session")
        return pb.WriteResponse(text=request.text, origin=self._origin(identity))


class EchoAgent:
    """A test agent of one cluster: EchoService on loopback, reached through a real chisel tunnel.

    ``async with EchoAgent(...)`` serves; :meth:`connect` dials the hub's tunnel server.
    """

    def __init__(self, cluster: str, *, key: bytes, chisel: ChiselBinary) -> None:
        self.service = EchoService(cluster, key)
        self._app = EchoServiceASGIApplication(self.service)
        self._chisel = chisel
        self._stop = asyncio.Event()
        self._server: asyncio.Task[None] | None = None
        self.tunnel: ChiselClient | None = None
        self.port = 0

    async def __aenter__(self) -> EchoAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Serve on a free loopback port (returns once the server runs)."""
        sock = create_listener("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        started = asyncio.Event()

        async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                while (message := await receive())["type"] != "lifespan.shutdown":
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                        started.set()
                await send({"type": "lifespan.shutdown.complete"})
                return
            if scope["path"] == "/ping":
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await self._app(scope, receive, send)

        self._server = asyncio.create_task(
            serve(app, sock, self._stop, graceful_timeout=2.0), name=f"echo-agent:{self.service.cluster}"
        )
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({waiter, self._server}, timeout=15.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not started.is_set():
            raise RuntimeError("the echo agent's server did not start within 15s")

    async def connect(
        self, server_url: str, fingerprint: str, *, user: str, password: str, tunnel_port: int
    ) -> ChiselClient:
        """Dial the hub's tunnel server; returns once the tunnel is up."""
        self.tunnel = ChiselClient(
            self._chisel,
            server_url=server_url,
            fingerprint=fingerprint,
            user=user,
            password=password,
            tunnel_port=tunnel_port,
            api_port=self.port,
            max_retry_interval=1.0,
        )
        await self.tunnel.start()
        if not await self.tunnel.wait_connected(30):
            raise RuntimeError(f"the echo agent's tunnel did not connect: {self.tunnel.state}")
        return self.tunnel

    async def stop(self) -> None:
        """Close the tunnel, then the server (idempotent)."""
        if self.tunnel is not None:
            await self.tunnel.stop()
            self.tunnel = None
        if self._server is not None:
            self._stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server, 10)
            self._server = None
