"""Serving any service from its descriptor by passing raw messages on: no handler per RPC.

The proxy (to an agent, :mod:`._proxy`) and the follower's forwarder (to the leader,
:mod:`._forward`) are :class:`Relay`\\ s: "send this message on and return the answer" and "send
these messages on and stream the answers back". :class:`PassThroughApplication` turns a
service descriptor and a relay into connectrpc's ASGI application, with one endpoint per method
of the matching shape (unary, server stream, client stream, bidirectional) and pass-through
codecs (binary and JSON): connectrpc still terminates every protocol the caller may speak
(Connect, gRPC, gRPC-Web; HTTP/1.1 and h2c), deadlines and compression, exactly as in its
generated applications, and the message bytes go on untouched. A new service therefore needs
no code here, only its descriptor (see :mod:`._services`).

:class:`RequestPipe` carries a client or bidirectional stream's messages to the next hop as they
arrive, so the caller and the far end talk in full duplex where HTTP/2 allows it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol, TypeVar

from connectrpc.client import ConnectClient
from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compression import Compression
from connectrpc.errors import ConnectError
from connectrpc.interceptor import Interceptor
from connectrpc.method import StreamType
from connectrpc.request import RequestContext
from connectrpc.server import DEFAULT_READ_MAX_BYTES, ConnectASGIApplication, Endpoint
from google.protobuf.descriptor import ServiceDescriptor  # type: ignore[import-untyped]  # no stubs

from ._codec import CODEC_JSON, CODEC_PROTO, PassthroughCodec, RawMessage
from ._errors import MalformedRequestError, to_connect_error
from ._observe import REQUEST_ID_HEADER, current_call
from ._routes import Route
from ._tasks import cancel_and_wait, spawn

logger = logging.getLogger(__name__)

T = TypeVar("T")

Context = RequestContext[Any, Any]
#: What a relay streams from: the one request of a server stream, or the caller's request stream.
Requests = RawMessage | AsyncIterator[RawMessage]


class Relay(Protocol):
    """Where a :class:`PassThroughApplication` sends each call."""

    async def unary(self, route: Route, request: RawMessage, ctx: Context) -> RawMessage:
        """Pass one request on; return the one answer."""
        ...

    def stream(self, route: Route, requests: Requests, ctx: Context) -> AsyncIterator[RawMessage]:
        """Pass a server stream's request, or a client or bidirectional stream, on; stream the answers."""
        ...


class PassThroughApplication(ConnectASGIApplication[Relay]):
    """connectrpc's ASGI application for every method of ``routes``' service, served by ``relay``."""

    def __init__(
        self,
        service: ServiceDescriptor,
        routes: Iterable[Route],
        relay: Relay,
        *,
        interceptors: Iterable[Interceptor] = (),
        compressions: Iterable[Compression] | None = None,
        read_max_bytes: int | None = DEFAULT_READ_MAX_BYTES,
    ) -> None:
        self._path = f"/{service.full_name}"
        self.routes = {route.procedure: route for route in routes}
        # connectrpc's public API names only the base Endpoint; its factories return the subclasses.
        endpoints: dict[str, Any] = {
            procedure: _endpoint(route, relay) for procedure, route in self.routes.items()
        }
        codecs: list[Codec] = [PassthroughCodec(CODEC_PROTO), PassthroughCodec(CODEC_JSON)]
        super().__init__(
            service=relay,
            endpoints=lambda _relay: endpoints,
            interceptors=interceptors,
            codecs=codecs,
            compressions=compressions,
            read_max_bytes=read_max_bytes,
        )

    @property
    def path(self) -> str:
        """The URL prefix of the service (``/<package>.<Service>``)."""
        return self._path


def _endpoint(route: Route, relay: Relay) -> Endpoint[RawMessage, RawMessage]:
    info = route.info
    match info.stream_type:
        case StreamType.UNARY:
            return Endpoint.unary(method=info, function=functools.partial(relay.unary, route))
        case StreamType.SERVER_STREAM:
            return Endpoint.server_stream(method=info, function=functools.partial(relay.stream, route))
        case StreamType.CLIENT_STREAM:

            async def collect(requests: AsyncIterator[RawMessage], ctx: Context) -> RawMessage:
                return await _only(relay.stream(route, requests, ctx))

            return Endpoint.client_stream(method=info, function=collect)
        case StreamType.BIDI_STREAM:
            return Endpoint.bidi_stream(method=info, function=functools.partial(relay.stream, route))
    raise AssertionError(f"unknown stream type {info.stream_type}")  # pragma: no cover


async def _only(responses: AsyncIterator[RawMessage]) -> RawMessage:
    """The one answer of a client stream (as connectrpc's own client insists on exactly one)."""
    found: RawMessage | None = None
    try:
        async for message in responses:
            if found is not None:
                raise ConnectError(Code.UNIMPLEMENTED, "unary response has multiple messages")
            found = message
    finally:
        await close_upstream(responses)
    if found is None:
        raise ConnectError(Code.UNIMPLEMENTED, "unary response has zero messages")
    return found


# --------------------------------------------------------------------------------------------------
# Request streams


_END = RawMessage(b"", "end")


class RequestPipe:
    """A caller's request stream, read by a task of its own and handed to the next hop as it comes.

    The caller's stream is connectrpc's, read in the request's own task and closed by connectrpc
    when the call ends; the next hop's HTTP client pulls its request body from elsewhere. So one
    owned task (:meth:`close` stops it) reads the caller's messages into a one-slot queue, which
    also keeps HTTP/2 flow control end to end: nothing is read from the caller before the next hop
    took the previous message. Reading the caller's stream can fail (a message over the request
    limit, a caller that leaves mid-stream); the next hop would only see a broken request body, so
    the failure is kept in :attr:`failure` for the relay to raise instead of the next hop's error.
    """

    def __init__(self, requests: AsyncIterator[RawMessage], *, name: str) -> None:
        self._requests = requests
        self._queue: asyncio.Queue[RawMessage] = asyncio.Queue(maxsize=1)
        self._first: RawMessage | None = None
        self.failure: Exception | None = None
        self._task = spawn(self._pump(), name=name)

    async def _pump(self) -> None:
        try:
            async for message in self._requests:
                await self._queue.put(message)
        except Exception as exc:  # the caller's stream broke: kept for the relay (see above)
            self.failure = exc
        await self._queue.put(_END)

    async def first(self, what: str) -> RawMessage:
        """The first message (kept for :meth:`messages`); ``what`` names the field it must carry."""
        if self._first is None:
            message = await self._queue.get()
            if message is _END:
                if self.failure is not None:
                    raise self.failure
                raise MalformedRequestError(
                    f"the request stream ended before its first message, which names the cluster ({what})"
                )
            self._first = message
        return self._first

    async def messages(self) -> AsyncIterator[RawMessage]:
        """Every message, the first included, as the caller sends them (the next hop's body)."""
        if self._first is not None:
            yield self._first
        while (message := await self._queue.get()) is not _END:
            yield message
        if self.failure is not None:
            # Not a clean end of the stream: the next hop must not take it for the caller's end.
            raise ConnectError(Code.CANCELED, "the caller's request stream failed")

    async def close(self) -> None:
        """Stop reading the caller's stream (idempotent)."""
        await cancel_and_wait([self._task])


def pass_on(
    client: ConnectClient,
    requests: RawMessage | RequestPipe,
    ctx: Context,
    headers: dict[str, str],
    timeout_ms: int | None,
) -> AsyncIterator[RawMessage]:
    """The next hop's answers to a streaming call: of a server stream's one request, or of the
    messages of a client or bidirectional stream's pipe (the same wire format either way)."""
    if isinstance(requests, RawMessage):
        return client.execute_server_stream(
            request=requests, method=ctx.method, headers=headers, timeout_ms=timeout_ms
        )
    return client.execute_bidi_stream(
        request=requests.messages(), method=ctx.method, headers=headers, timeout_ms=timeout_ms
    )


def caller_failure(pipe: RequestPipe | None) -> ConnectError | None:
    """The error of a caller whose own request stream broke (a message over the limit, a caller
    that left): that, not the next hop's view of a cut-off request, is the call's outcome."""
    if pipe is None or pipe.failure is None:
        return None
    return to_connect_error(pipe.failure)


# --------------------------------------------------------------------------------------------------
# What every relay does


def next_hop_timeout_ms(ctx: Context, hop: str) -> int | None:
    """The caller's remaining deadline for the call passed on to ``hop`` (None: it has none).

    deadline_exceeded at once if it has already passed, instead of a call that cannot succeed.
    """
    remaining = ctx.timeout_ms
    if remaining is None:
        return None
    if remaining <= 0:
        raise ConnectError(Code.DEADLINE_EXCEEDED, f"the deadline passed before the call reached {hop}")
    return max(1, int(remaining))


def with_request_id(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the current call's request id (so the next hop logs the same id)."""
    call = current_call()
    if call is not None:
        headers[REQUEST_ID_HEADER] = call.request_id
    return headers


#: How long an early end waits for a message being delivered to be taken, before it cuts the
#: stream anyway (a caller that stopped reading).
DELIVERY_GRACE_SECONDS = 1.0


class EndableStream:
    """A relayed stream that its relay may end early with an answer of its own (unavailable, when
    the hub shuts down or stops leading), by cancelling the call's task with a reason it then
    translates.

    The task is cancelled only while it waits for the next hop. While it delivers a message to the
    caller (connectrpc's send, the relay suspended at its ``yield``), a cancellation would cut the
    response where it stands: the caller would see a broken stream ("Request was cancelled")
    instead of the answer. The end then waits until that message is out (:meth:`relay` raises the
    cancellation itself), or :data:`DELIVERY_GRACE_SECONDS` for a caller that does not read.
    """

    __slots__ = ("_delivering", "_reason", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self._reason: str | None = None
        self._delivering = False

    def end(self, reason: str) -> None:
        """End the stream with ``reason`` (the first reason given wins)."""
        if self._reason is not None:
            return
        self._reason = reason
        if self._delivering:
            asyncio.get_running_loop().call_later(DELIVERY_GRACE_SECONDS, self._cut)
        else:
            self.task.cancel(reason)

    def _cut(self) -> None:
        if self._delivering and not self.task.done():
            self.task.cancel(self._reason)

    async def relay(self, upstream: AsyncIterator[T]) -> AsyncIterator[T]:
        """``upstream``'s messages, until :meth:`end` (then ``CancelledError(reason)``)."""
        async for message in upstream:
            self._delivering = True
            try:
                yield message
            finally:
                self._delivering = False
            if self._reason is not None:
                raise asyncio.CancelledError(self._reason)


async def close_upstream(upstream: AsyncIterator[Any]) -> None:
    """Close a passed-on stream now (HTTP/2 RST_STREAM), not whenever it is garbage-collected."""
    aclose: Callable[[], Any] | None = getattr(upstream, "aclose", None)
    if aclose is not None:
        await aclose()
