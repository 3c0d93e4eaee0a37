"""A test agent that serves ``otterscale.testing.echo.v1.EchoService`` behind a real chisel tunnel.

EchoService (``packages/testing/proto``) has every call shape and every kind of route, so a hub
that is told only its descriptor shows that it forwards any service without code of its own.
:class:`EchoAgent` serves it the way the real agent serves its services: connectrpc's generated
ASGI application (on the test doubles' own HTTP/1.1 + h2c server, :class:`~otterscale.testing.
AgentDouble`), every call checked against the hub's signed identity headers for its cluster and
procedure (all four call shapes, not only the ones the real agent has today), ``GET /ping`` for
the hub's prober, and a real ``chisel client`` dialling the hub's tunnel server.

:class:`EchoService` records what it saw, in order (:attr:`EchoService.events`), so a test can
tell, for instance, that the agent answered a bidirectional stream's first message before the
second one arrived (full duplex end to end).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from otterscale.common import ChiselBinary, Identity, IdentityHeaderError, verify_identity

from ._doubles import AgentDouble
from .echo.v1 import echo_pb2 as pb
from .echo.v1.echo_connect import EchoServiceASGIApplication

#: The EchoService descriptor: what a hub needs to forward it (``HubSettings.routed_services``).
ECHO_SERVICE = pb.DESCRIPTOR.services_by_name["EchoService"]
#: The same for a hub process: ``HubProcess(..., routed_services=[ECHO_ROUTE])``.
ECHO_ROUTE = f"{pb.__name__}:EchoService"


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
        #: Set whenever a stream ends on the agent (however it ends); set in the agent's thread.
        self.stream_ended = threading.Event()

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


class EchoAgent(AgentDouble):
    """A test agent of one cluster: EchoService on loopback, reached through a real chisel tunnel.

    An :class:`~otterscale.testing.AgentDouble`: ``async with EchoAgent(...)`` (or ``await
    start()``) serves; :meth:`connect` dials the hub's tunnel server; ``await stop()`` ends it.
    """

    def __init__(self, cluster: str, *, key: bytes, chisel: ChiselBinary) -> None:
        self.service = EchoService(cluster, key)
        super().__init__(
            cluster, EchoServiceASGIApplication(self.service), chisel=chisel, name=f"echo-agent:{cluster}"
        )


# --------------------------------------------------------------------------------------------------
# EchoService answered by the hub itself


class HubEcho:
    """EchoService answered by the hub itself, as a hub-served service is (the shape of the coming
    fan-out MultiClusterService): it authenticates each call with the hub's authenticator and
    answers from the request alone. Served through :data:`ECHO_HUB_SERVICE`."""

    def __init__(self, context: Any) -> None:
        self._auth = context.authenticator

    async def _origin(self, cluster: str, ctx: RequestContext[Any, Any]) -> Any:
        from otterscale.common import OtterscaleError
        from otterscale.hub._errors import to_connect_error  # the hub running this: its translation

        try:
            identity = await self._auth.authenticate(ctx.request_headers.getall("authorization"))
        except OtterscaleError as exc:
            raise to_connect_error(exc) from None
        return pb.Origin(cluster=cluster, subject=identity.subject)

    async def say(self, request: Any, ctx: RequestContext[Any, Any]) -> Any:
        origin = await self._origin(request.cluster, ctx)
        kind, _, argument = request.text.partition(":")
        if kind == "fail":
            raise ConnectError(Code(argument), f"asked to fail with {argument}")
        return pb.SayResponse(text=request.text, origin=origin)

    async def count(self, request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        origin = await self._origin(request.cluster, ctx)
        for index in range(request.count):
            yield pb.CountResponse(index=index, origin=origin)

    async def collect(self, requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]) -> Any:
        origin = await self._origin("", ctx)
        found = [request.text async for request in requests if request.WhichOneof("kind") == "text"]
        return pb.CollectResponse(texts=found, origin=origin)

    async def chat(self, requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        origin = await self._origin("", ctx)
        async for request in requests:
            yield pb.ChatResponse(text=request.text or "started", origin=origin)

    async def write(self, request: Any, ctx: RequestContext[Any, Any]) -> Any:
        return pb.WriteResponse(text=request.text, origin=await self._origin("", ctx))


def hub_served_echo(context: Any) -> Any:
    """The application of the hub-served EchoService (a ``HubService`` factory: ``context`` is the
    hub's ``ServiceContext``; its interceptors give it the access log, metrics and audit trail)."""
    return EchoServiceASGIApplication(HubEcho(context), interceptors=context.interceptors)


#: EchoService answered by a hub process itself: ``HubProcess(..., hub_services=[ECHO_HUB_SERVICE])``.
ECHO_HUB_SERVICE = f"{ECHO_ROUTE}={__name__}:hub_served_echo"
