"""The hub's limits on hostile or broken clients: what it accepts, holds and keeps open for them.

Each refusal is a Connect ``resource_exhausted`` whose message names the limit and the
``otterscale.yaml`` key that changes it (the optional ``limits`` section, see
``otterscale.common.HubLimitsConfig``), and is counted in
``otterscale_hub_limit_refusals_total{reason=...}``.

``max_request_bytes`` (default 4 MiB, reason ``request_too_large``)
    A larger request body, or a larger enveloped message, is refused before it is buffered: at
    once when ``Content-Length`` says so, else as soon as that many bytes have arrived (chunked
    or streamed bodies). Of a client or bidirectional stream, which may carry any number of
    messages, each message is bounded (on its envelope's length prefix), not the whole body. A
    gzip-compressed request (connectrpc clients compress by default) is inflated only up to the
    limit and refused past it (:class:`BoundedGzipCompression`).
``max_response_bytes`` (default 64 MiB, reason ``response_too_large``)
    An agent's unary answer stops being read there; the call ends asking the caller to page
    with limit/continue. A single Watch event over it ends the Watch (connectrpc's message).
``max_watches_per_subject`` (default 1000, reason ``watch_limit``)
    The next stream (a Watch, or any other server, client or bidirectional stream: each holds a
    connection open) of that authenticated subject is refused; a stream that ends for any reason
    (client cancel, agent error, hub drain, slow client) frees its slot.
``max_requests_per_peer`` (default 2000, reason ``peer_requests``)
    Calls and open streams in progress from one caller address (the client's own address; for a
    call another replica forwarded, the caller address that replica signed): the next one is
    refused before it is authenticated or its body read (:class:`PeerLimit`). Envoy bounds
    connections overall and streams per connection but has no per-address bound.
``watch_send_timeout_seconds`` (default 30, reason ``slow_watch_client``)
    A stream (Watch or other) whose client has not accepted a message for that long is ended.
    No status can reach a client that does not read, so the stream is reset (RST_STREAM on
    HTTP/2); its agent stream, slot and gauge are released at once.

Memory: a refused request costs at most ``max_request_bytes`` plus one read chunk (the rest of
its body is read and dropped, not kept); a unary answer at most about twice ``max_response_bytes``
while it is collected and handed over (one growing buffer, one copy); a Watch whose client stops
reading at most Envoy's per-connection buffer (64 KiB) plus an event or two in the hub, with
HTTP/2 flow control holding the rest back in the agent and kube-apiserver, and only for
``watch_send_timeout_seconds``.

Nothing here logs or echoes a header value: no token.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from connectrpc.code import Code
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from pyqwest import Request, Response, Transport

from otterscale.common import refusal

from ._errors import (
    RequestTooLargeError,
    ResponseTooLargeError,
    SlowWatchClientError,
    WatchLimitError,
    to_connect_error,
)
from ._observe import FORWARDED_FOR_HEADER
from ._routes import Route, cluster_routes, routes_by_procedure
from ._services import ROUTED_SERVICES

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 4 * MIB
DEFAULT_MAX_RESPONSE_BYTES = 64 * MIB
DEFAULT_MAX_WATCHES_PER_SUBJECT = 1000
DEFAULT_WATCH_SEND_TIMEOUT = 30.0

#: The 5-byte prefix (flags and length) of each message in the gRPC and Connect streaming bodies.
ENVELOPE_PREFIX = 5

#: ``reason`` labels of ``otterscale_hub_limit_refusals_total``.
REQUEST_TOO_LARGE = "request_too_large"
RESPONSE_TOO_LARGE = "response_too_large"
WATCH_LIMIT = "watch_limit"
SLOW_WATCH_CLIENT = "slow_watch_client"
PEER_REQUESTS = "peer_requests"
_FORWARDED_FOR = FORWARDED_FOR_HEADER.encode("ascii")
DEFAULT_MAX_REQUESTS_PER_PEER = 2000

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HubLimits:
    """The limits of one hub (see the module docstring); built from ``config.limits``."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_watches_per_subject: int = DEFAULT_MAX_WATCHES_PER_SUBJECT
    watch_send_timeout: float = DEFAULT_WATCH_SEND_TIMEOUT
    max_requests_per_peer: int = DEFAULT_MAX_REQUESTS_PER_PEER

    @classmethod
    def from_config(cls, limits: Any) -> HubLimits:
        """From the ``limits`` section of ``OtterscaleConfig`` (already validated there)."""
        return cls(
            max_request_bytes=limits.max_request_bytes,
            max_response_bytes=limits.max_response_bytes,
            max_watches_per_subject=limits.max_watches_per_subject,
            watch_send_timeout=limits.watch_send_timeout_seconds,
            max_requests_per_peer=limits.max_requests_per_peer,
        )


def size_text(size: int) -> str:
    """``4194304 bytes (4 MiB)``: exact, and readable when it is a whole number of KiB or MiB."""
    for unit, name in ((MIB, "MiB"), (1024, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size} bytes ({size // unit} {name})"
    return f"{size} bytes"


def request_too_large(limit: int) -> RequestTooLargeError:
    """The error of a request body over ``limit`` bytes."""
    return RequestTooLargeError(
        f"the request is larger than the hub's limit of {size_text(limit)} "
        "(limits.max_request_bytes in otterscale.yaml)"
    )


def response_too_large(cluster: str, limit: int) -> ResponseTooLargeError:
    """The error of an agent answer over ``limit`` bytes."""
    return ResponseTooLargeError(
        f"the answer of cluster {cluster!r} is larger than the hub's limit of {size_text(limit)} "
        "(limits.max_response_bytes in otterscale.yaml); page with limit/continue"
    )


# --------------------------------------------------------------------------------------------------
# Stream slots


class WatchSlots:
    """At most ``limit`` concurrent streams per authenticated subject (pure bookkeeping).

    Named after the first streaming RPC (``limits.max_watches_per_subject``); every streaming
    call of every routed service takes a slot.

    :meth:`acquire` takes a slot or raises :class:`WatchLimitError`; every successful acquire is
    paired with exactly one :meth:`release` (the proxy does it in a ``finally``).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the Watch limit must be at least 1")
        self.limit = limit
        self._held: dict[str, int] = {}

    def held(self, subject: str) -> int:
        """Slots ``subject`` holds now."""
        return self._held.get(subject, 0)

    def total(self) -> int:
        """Slots held by every subject."""
        return sum(self._held.values())

    def subjects(self) -> int:
        """Subjects holding a slot now: what the hub keeps in memory for this limit (a subject
        whose last stream ended is forgotten)."""
        return len(self._held)

    def acquire(self, subject: str, method: str = "Watch") -> None:
        """Take a slot for ``subject``'s ``method`` stream; raise :class:`WatchLimitError` when it
        holds ``limit``."""
        held = self._held.get(subject, 0)
        if held >= self.limit:
            raise WatchLimitError(
                f"too many concurrent {method} streams for this caller: the hub's limit is {self.limit} "
                "per subject (limits.max_watches_per_subject in otterscale.yaml); close one first"
            )
        self._held[subject] = held + 1

    def release(self, subject: str) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        held = self._held.get(subject, 0)
        if held <= 1:
            self._held.pop(subject, None)
        else:
            self._held[subject] = held - 1


# --------------------------------------------------------------------------------------------------
# Requests and slow stream clients: ASGI middleware in front of every API service


class PeerLimit:
    """ASGI middleware: at most ``limit`` calls in progress per caller address (0: no limit).

    Runs behind :class:`~._replicas.ReplicaHeaderGuard`, so a forwarding header that is still
    there was signed by a replica: a call a follower forwards counts for the caller it names,
    not for the follower. The refusal is answered in the caller's protocol before anything else
    looks at the request.
    """

    def __init__(self, app: ASGIApp, limit: int, *, on_refused: Callable[[str], None]) -> None:
        self._app = app
        self._limit = limit
        self._on_refused = on_refused
        self._held: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._limit:
            await self._app(scope, receive, send)
            return
        peer = caller_address(scope)
        held = self._held.get(peer, 0)
        if held >= self._limit:
            self._on_refused(PEER_REQUESTS)
            message = (
                f"this address has {self._limit} calls in progress on this hub already "
                "(limits.max_requests_per_peer in otterscale.yaml); end some first"
            )
            for response in refusal(scope, "resource_exhausted", message):
                await send(response)
            return
        self._held[peer] = held + 1
        try:
            await self._app(scope, receive, send)
        finally:
            left = self._held[peer] - 1
            if left:
                self._held[peer] = left
            else:
                del self._held[peer]


def caller_address(scope: Scope) -> str:
    """The address a call comes from: the signed forwarded-for of a replica's call, else the peer's
    own (an IPv4 peer of a dual-stack listener arrives IPv4-mapped: one key for both forms)."""
    for name, value in scope.get("headers", ()):
        if name == _FORWARDED_FOR:
            return bytes(value).decode("latin-1").removeprefix("::ffff:")
    client = scope.get("client")
    return str(client[0]).removeprefix("::ffff:") if client else "?"


class ClientLimits:
    """ASGI middleware: the request size limit for every call, the send timeout for streams.

    ``routes`` (by procedure path) says which calls stream requests or responses; by default
    those of the hub's cluster-routed services.

    Request bodies: ``receive`` is wrapped so that a body over the limit raises a Connect
    ``resource_exhausted`` inside connectrpc, which answers it in the caller's protocol (Connect
    unary, Connect streaming, gRPC, gRPC-Web) exactly like its own errors. It is raised before
    any byte is read when ``Content-Length`` is too large, else when the bytes read so far (or
    an envelope's length prefix) pass the limit, so nothing larger is ever buffered. A request
    stream's messages are bounded one by one, on each envelope's length prefix.

    The answer goes out at once: Envoy drops the rest of a refused body (its other streams are
    unaffected).

    Streamed responses: each ``send`` of the response may take at most ``watch_send_timeout``;
    a send blocks only when the client's HTTP/2 window and Envoy's small buffer are full, that is
    when the client has not accepted data for that long. The call then ends
    (the handler's generator is closed, which closes the agent stream and frees the slot) and
    every later send fails at once, so nothing else waits on that client.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: HubLimits,
        *,
        on_refused: Callable[[str], None],
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self._app = app
        self._limits = limits
        self._on_refused = on_refused
        self._routes = routes if routes is not None else default_routes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        route = self._routes.get(scope["path"])
        per_message = route is not None and route.streams_requests
        body = _BodyLimit(scope, receive, self._limits.max_request_bytes, self._on_refused, per_message)
        await self._serve(scope, body, send, route)

    async def _serve(self, scope: Scope, body: _BodyLimit, send: Send, route: Route | None) -> None:
        if route is None or not route.streams_responses:
            await self._app(scope, body, send)
            return
        sender = _StreamSender(send, self._limits.watch_send_timeout, self._on_refused, route)
        try:
            await self._app(scope, body, sender)
        except ConnectError as exc:
            if exc is not sender.stalled:
                raise
            # The stream cannot be ended in-band (the client reads nothing): returning without
            # completing the response makes the server reset it (Envoy: its idle timeout on the
            # route, a moment later).


class _BodyLimit:
    """The request's ``receive`` that refuses a body over the limit (see :class:`ClientLimits`).

    ``per_message``: the body is a request stream; each enveloped message is bounded, not the whole.
    """

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        limit: int,
        on_refused: Callable[[str], None],
        per_message: bool = False,
    ) -> None:
        self._receive = receive
        self._limit = limit
        self._on_refused = on_refused
        content_type = _header(scope, b"content-type") or ""
        self._enveloped = content_type.startswith(("application/grpc", "application/connect+"))
        self._per_message = per_message and self._enveloped
        # An enveloped body carries the message plus its 5-byte prefix.
        self._allowed = limit + (ENVELOPE_PREFIX if self._enveloped else 0)
        declared = _header(scope, b"content-length")
        self._declared = int(declared) if declared is not None and declared.isdigit() else None
        self._received = 0
        self._prefix = b""
        self._payload_left = 0  # bytes of the current message still to come (per_message)
        self._done = False
        self.refused = False

    async def __call__(self) -> dict[str, Any]:
        if (
            not self._per_message
            and self._declared is not None
            and self._declared > self._allowed
            and not self._done
        ):
            self._refuse()
        message = await self._receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            self._received += len(chunk)
            if not message.get("more_body", False):
                self._done = True
            if self._per_message:
                self._messages(chunk)
                return message
            if self._enveloped and len(self._prefix) < ENVELOPE_PREFIX:
                self._prefix += chunk[: ENVELOPE_PREFIX - len(self._prefix)]
                if (
                    len(self._prefix) == ENVELOPE_PREFIX
                    and int.from_bytes(self._prefix[1:], "big") > self._limit
                ):
                    self._refuse()
            if self._received > self._allowed:
                self._refuse()
        elif message["type"] == "http.disconnect":
            self._done = True
        return message

    def _messages(self, chunk: bytes) -> None:
        """Follow the envelopes of a request stream; refuse one that announces too much."""
        position, end = 0, len(chunk)
        while position < end:
            if self._payload_left:
                taken = min(self._payload_left, end - position)
                self._payload_left -= taken
                position += taken
                continue
            taken = min(ENVELOPE_PREFIX - len(self._prefix), end - position)
            self._prefix += chunk[position : position + taken]
            position += taken
            if len(self._prefix) == ENVELOPE_PREFIX:
                self._payload_left = int.from_bytes(self._prefix[1:], "big")
                self._prefix = b""
                if self._payload_left > self._limit:
                    self._refuse()

    def _refuse(self) -> None:
        if not self.refused:
            self.refused = True
            self._on_refused(REQUEST_TOO_LARGE)
        raise to_connect_error(request_too_large(self._limit))


class _StreamSender:
    """A streamed response's ``send``, bounded in time (see :class:`ClientLimits`)."""

    def __init__(self, send: Send, timeout: float, on_refused: Callable[[str], None], route: Route) -> None:
        self._send = send
        self._timeout = timeout
        self._on_refused = on_refused
        self._route = route
        self.stalled: ConnectError | None = None

    async def __call__(self, message: dict[str, Any]) -> None:
        if self.stalled is not None:
            raise self.stalled
        try:
            async with asyncio.timeout(self._timeout):
                await self._send(message)
        except TimeoutError:
            self._on_refused(SLOW_WATCH_CLIENT)
            route = self._route
            what, again = ("event", "resume from the last resourceVersion")
            if not route.resumable:
                what, again = ("message", f"call {route.method} again")
            self.stalled = to_connect_error(
                SlowWatchClientError(
                    f"the client accepted no {route.method} {what} for {self._timeout:g}s "
                    f"(limits.watch_send_timeout_seconds in otterscale.yaml); {again}"
                )
            )
            raise self.stalled from None


class BoundedGzipCompression(GzipCompression):
    """connectrpc's gzip, whose refusal of a request that inflates past the limit is the hub's.

    connectrpc inflates a compressed request only up to its ``read_max_bytes`` (the hub sets it
    to ``max_request_bytes``) and then raises its own ``resource_exhausted``; this turns that into
    the same message and counter as an uncompressed body over the limit.
    """

    def __init__(self, level: int, *, on_refused: Callable[[str], None]) -> None:
        super().__init__(level=level)
        self._on_refused = on_refused

    def decompress(self, data: bytes | bytearray | memoryview, read_max_bytes: int | None = None) -> bytes:
        """Inflate ``data``; refuse it past ``read_max_bytes`` with the hub's message."""
        try:
            return super().decompress(data, read_max_bytes)
        except ConnectError as exc:
            if exc.code is not Code.RESOURCE_EXHAUSTED or read_max_bytes is None:
                raise
            self._on_refused(REQUEST_TOO_LARGE)
            raise to_connect_error(request_too_large(read_max_bytes)) from None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1").strip()
    return None


# --------------------------------------------------------------------------------------------------
# Responses: a pyqwest transport that stops reading an answer at the limit


#: A smaller bound than the transport's for the calls made in this context (a fan-out leg gets
#: its share of the page's bytes, see ``_fanout``); None: the transport's own limit.
CALL_RESPONSE_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "otterscale_hub_call_response_limit", default=None
)


class BoundedTransport:
    """A pyqwest transport whose responses end with :class:`ResponseTooLargeError` past ``limit``.

    Wraps the transport of unary calls to agents: connectrpc's client buffers a whole unary
    answer before its own ``read_max_bytes`` check, so the bound has to be applied while the
    body is read. A ``Content-Length`` over the limit is refused before reading anything.
    :data:`CALL_RESPONSE_LIMIT` lowers the limit for the calls of one context.
    """

    def __init__(self, inner: Transport, limit: int) -> None:
        self._inner = inner
        self.limit = limit

    async def execute(self, request: Request) -> Response:
        """Execute ``request`` on the inner transport; bound the body of its response."""
        limit = self.limit
        lower = CALL_RESPONSE_LIMIT.get()
        if lower is not None and lower < limit:
            limit = lower
        response = await self._inner.execute(request)
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await response.aclose()
                raise ResponseTooLargeError(f"the answer is larger than {size_text(limit)}")
            # The HTTP stack refuses a body longer than its Content-Length, so the body is bounded
            # already: hand it on untouched (re-chunking 5 MB through Python cost a List ~50 ms).
            return response
        return Response(
            status=response.status,
            http_version=response.http_version,
            headers=response.headers,
            content=self._bounded(response, limit),
            trailers=response.trailers,
        )

    async def _bounded(self, response: Response, limit: int) -> AsyncIterator[bytes]:
        received = 0
        try:
            async for chunk in response.content:
                received += len(chunk)
                if received > limit:
                    raise ResponseTooLargeError(f"the answer is larger than {size_text(limit)}")
                yield bytes(chunk)
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        """Nothing of its own to close: the inner transport is closed by its owner."""


def is_response_too_large(exc: ConnectError) -> bool:
    """Whether connectrpc's client error ``exc`` came from :class:`BoundedTransport`."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ResponseTooLargeError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def default_routes() -> Mapping[str, Route]:
    """The routes of the hub's own cluster-routed services (:data:`._services.ROUTED_SERVICES`)."""
    return routes_by_procedure(route for service in ROUTED_SERVICES for route in cluster_routes(service))
