"""Followers forward: every call of every API service goes on to the leader.

With leader election only the leader runs the tunnel server, so only it can reach the agents
(and only it knows their state). A follower serves the same routes with this forwarder, which
re-issues each call to ``http://<leader Pod IP>:<the fixed --address port>`` (from
:class:`~._leader.LeaderTracker`'s cache: no API request per call) over warm HTTP/2
connections, with the same procedure, codec and message bytes (pass-through codecs, nothing is
decoded), and passes the answer back as it came: response bytes, error code, message and
details unchanged. Every call shape alike (unary, server, client and bidirectional streams,
the last two passed on message by message as they arrive), whatever protocol the caller speaks
(Connect, gRPC, gRPC-Web over HTTP/1.1 or h2c): the follower terminates the caller's protocol and
speaks Connect to the leader over HTTP/2. Cluster-routed and hub-served services are forwarded
the same way, from their descriptors (:mod:`._services`): the follower reads no field of any
request, the leader routes it.

What goes with a forwarded call, and nothing else:

- the caller's ``Authorization`` (the leader authenticates the caller again: followers are not
  trusted to vouch for anyone, so a forwarded call carries exactly the caller's identity);
- the remaining deadline (``connect-timeout-ms``);
- the request id;
- ``X-Otterscale-Forwarded-By: <this replica>``, the hop guard: a replica that receives a call
  carrying it and does not lead answers unavailable instead of forwarding it again, so two
  replicas that disagree about the leader for a moment never bounce a call between them;
  with ``X-Otterscale-Forwarded-For`` (the caller's address) and a signature, so the receiving
  replica trusts neither unless another replica sent them (:mod:`._replicas`).

During a hand-over a follower answers unavailable at once, saying why (no leader, the leader's
address is not known yet, the leader cannot be reached: connect timeout 2 s), instead of
queueing calls. When the leader changes, calls and streams still open to the former one end
with unavailable (clients resume a Watch from its last resourceVersion); the connection to a
leader that was killed may otherwise never report its death.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from connectrpc.client import ConnectClient
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import AuthenticationError, OtterscaleError

from ._codec import CODEC_JSON, CODEC_PROTO, PassthroughCodec, RawMessage
from ._errors import LeaderUnavailableError, NotLeaderError, ShuttingDownError, to_connect_error
from ._metrics import HubMetrics
from ._observe import FORWARDED_BY_HEADER
from ._passthrough import (
    Context,
    EndableStream,
    RequestPipe,
    Requests,
    caller_failure,
    close_upstream,
    next_hop_timeout_ms,
    pass_on,
    with_request_id,
)
from ._replicas import ReplicaSigner
from ._routes import Route
from ._upstream import MAX_RESPONSE_BYTES, STREAM_TRANSPORTS

if TYPE_CHECKING:
    # Types only: the Kubernetes client it uses is loaded only for --leader-elect (start-up time).
    from ._leader import LeaderInfo, Leadership

logger = logging.getLogger(__name__)

#: The hop guard: set on every forwarded call to the identity of the replica that forwarded it.
HOP_HEADER = FORWARDED_BY_HEADER
#: How long a follower waits for a TCP connection to the leader.
CONNECT_TIMEOUT = 2.0

_SHUTDOWN = "otterscale-hub-forward-shutdown"
_LEADER_CHANGED = "otterscale-hub-leader-changed"


class LeaderForwarder:
    """The :class:`~._passthrough.Relay` of every API service on a follower (see the module docstring).

    Served by :class:`~._passthrough.PassThroughApplication`\\ s built from the descriptors of
    every cluster-routed and hub-served service.
    """

    def __init__(self, leadership: Leadership, metrics: HubMetrics, replicas: ReplicaSigner) -> None:
        self._leadership = leadership
        self._metrics = metrics
        self._replicas = replicas
        self._transports = [_transport() for _ in range(1 + STREAM_TRANSPORTS)]
        self._http = [Client(transport) for transport in self._transports]
        self._clients: dict[tuple[str, str, int], ConnectClient] = {}
        #: task -> (leader URL, the stream: None for a unary call)
        self._calls: dict[asyncio.Task[Any], tuple[str, EndableStream | None]] = {}
        self._open_streams = [0] * STREAM_TRANSPORTS
        self._draining = False

    # ----------------------------------------------------------------------------------------------
    # Leader changes and shutdown

    @property
    def open_calls(self) -> int:
        """Forwarded calls (unary and streams) open right now."""
        return len(self._calls)

    def leader_changed(self) -> None:
        """End the calls open to a replica that no longer leads (with unavailable)."""
        info = self._leadership.leader()
        current = info.url if info is not None else None
        for task, (url, stream) in list(self._calls.items()):
            if url == current:
                continue
            if stream is None:
                task.cancel(_LEADER_CHANGED)
            else:
                stream.end(_LEADER_CHANGED)

    def drain(self) -> None:
        """Refuse new streams; end the open ones with unavailable (this replica shuts down)."""
        self._draining = True
        for _url, stream in list(self._calls.values()):
            if stream is not None:
                stream.end(_SHUTDOWN)

    async def aclose(self) -> None:
        """Close every connection to the leader (idempotent)."""
        for transport in self._transports:
            await transport.aclose()

    # ----------------------------------------------------------------------------------------------
    # Relay

    async def unary(self, route: Route, request: RawMessage, ctx: Context) -> RawMessage:
        """Forward one unary call to the leader."""
        code = "ok"
        task = asyncio.current_task()
        assert task is not None
        try:
            leader, headers, timeout_ms = self._prepare(route, ctx, stream=False)
            client = self._client(leader, request.codec, 0)
            self._calls[task] = (client_url(leader), None)
            try:
                response: RawMessage = await client.execute_unary(
                    request=request, method=ctx.method, headers=headers, timeout_ms=timeout_ms
                )
            except ConnectError as exc:
                raise self._upstream_error(route, leader, exc, task) from None
            except asyncio.CancelledError as exc:
                raise self._cancelled(route, leader, exc, task) from None
            return response
        except ConnectError as exc:
            code = exc.code.value
            raise
        except OtterscaleError as exc:
            error = to_connect_error(exc)
            code = error.code.value
            raise error from None
        except asyncio.CancelledError:
            code = "canceled"
            raise
        finally:
            self._calls.pop(task, None)
            self._count(ctx, code)

    async def stream(self, route: Route, requests: Requests, ctx: Context) -> AsyncIterator[RawMessage]:
        """Forward a streaming call (any of the three shapes) to the leader."""
        code = "ok"
        task = asyncio.current_task()
        assert task is not None
        index = -1
        pipe: RequestPipe | None = None
        try:
            leader, headers, timeout_ms = self._prepare(route, ctx, stream=True)
            index = min(range(STREAM_TRANSPORTS), key=self._open_streams.__getitem__)
            self._open_streams[index] += 1
            endable = EndableStream(task)
            self._calls[task] = (client_url(leader), endable)
            try:
                if isinstance(requests, RawMessage):
                    client = self._client(leader, requests.codec, 1 + index)
                    upstream = pass_on(client, requests, ctx, headers, timeout_ms)
                else:
                    # A request stream goes on as it arrives; the leader routes it by its first message.
                    pipe = RequestPipe(requests, name=f"hub-forward-requests:{route.procedure}")
                    client = self._client(leader, _codec(ctx), 1 + index)
                    upstream = pass_on(client, pipe, ctx, headers, timeout_ms)
                try:
                    async for message in endable.relay(upstream):
                        yield message
                finally:
                    await close_upstream(upstream)
            except ConnectError as exc:
                if (failure := caller_failure(pipe)) is not None:
                    raise failure from None
                raise self._upstream_error(route, leader, exc, task) from None
            except asyncio.CancelledError as exc:
                raise self._cancelled(route, leader, exc, task) from None
        except ConnectError as exc:
            code = exc.code.value
            raise
        except OtterscaleError as exc:
            error = to_connect_error(exc)
            code = error.code.value
            raise error from None
        except (asyncio.CancelledError, GeneratorExit):
            code = "canceled"
            raise
        finally:
            if index >= 0:
                self._open_streams[index] -= 1
            self._calls.pop(task, None)
            if pipe is not None:
                await pipe.close()
            self._count(ctx, code)

    def _prepare(
        self, route: Route, ctx: Context, *, stream: bool
    ) -> tuple[LeaderInfo, dict[str, str], int | None]:
        me = self._leadership.identity
        forwarded_by = ctx.request_headers.get(HOP_HEADER)
        if forwarded_by:
            raise NotLeaderError(
                f"replica {me} does not lead (the call was forwarded by {forwarded_by}, which thought "
                "it did): leadership is changing, retry in a moment"
            )
        if stream and self._draining:
            raise ShuttingDownError(f"the hub is shutting down; retry {route.again}")
        leader = self._leadership.leader()
        if leader is None:
            raise LeaderUnavailableError(
                "no hub replica leads right now (a hand-over is in progress); retry in a few seconds"
            )
        if leader.identity == me:
            raise LeaderUnavailableError(f"replica {me} is taking over the leadership; retry in a moment")
        if leader.address is None:
            raise LeaderUnavailableError(
                f"the address of the leader {leader.identity} is not known yet; retry in a moment"
            )
        authorization = ctx.request_headers.getall("authorization")
        if len(authorization) > 1:
            raise AuthenticationError("more than one Authorization header")
        # Signed (see ._replicas): the leader keeps the hop guard and the caller's address only then.
        headers = self._replicas.headers(me, ctx.client_address or "", route.procedure)
        if authorization:
            headers["authorization"] = authorization[0]
        timeout_ms = next_hop_timeout_ms(ctx, f"the leader {leader.identity}")
        return leader, with_request_id(headers), timeout_ms

    def _client(self, leader: LeaderInfo, codec: str, index: int) -> ConnectClient:
        url = client_url(leader)
        key = (url, codec, index)
        found = self._clients.get(key)
        if found is None:
            if len(self._clients) > 64:  # leaders come and go: forget clients of former ones
                self._clients = {k: v for k, v in self._clients.items() if k[0] == url}
            found = self._clients[key] = ConnectClient(
                url,
                codec=PassthroughCodec(codec if codec in (CODEC_PROTO, CODEC_JSON) else CODEC_PROTO),
                protocol=ProtocolType.CONNECT,
                accept_compression=(),
                send_compression=None,
                read_max_bytes=MAX_RESPONSE_BYTES,
                http_client=self._http[index],
            )
        return found

    def _upstream_error(
        self, route: Route, leader: LeaderInfo, exc: ConnectError, task: asyncio.Task[Any]
    ) -> BaseException:
        cause = exc.__cause__
        if isinstance(cause, asyncio.CancelledError):
            return self._cancelled(route, leader, cause, task)
        if exc.code is Code.UNAVAILABLE and cause is not None and not isinstance(cause, ConnectError):
            # A transport failure: the leader was never reached, or went away mid-call.
            reason = str(cause).strip() or type(cause).__name__
            return to_connect_error(
                LeaderUnavailableError(
                    f"the leader {leader.identity} at {leader.address} cannot be reached ({reason}); "
                    "leadership may be changing, retry in a moment"
                )
            )
        return exc

    def _cancelled(
        self, route: Route, leader: LeaderInfo, exc: asyncio.CancelledError, task: asyncio.Task[Any]
    ) -> BaseException:
        if exc.args == (_LEADER_CHANGED,):
            task.uncancel()
            return to_connect_error(
                LeaderUnavailableError(f"{leader.identity} no longer leads; retry {route.again}")
            )
        if exc.args == (_SHUTDOWN,):
            task.uncancel()
            return to_connect_error(ShuttingDownError(f"the hub is shutting down; resume {route.again}"))
        return exc

    def _count(self, ctx: Context, code: str) -> None:
        self._metrics.forwarded_rpcs.labels(
            service=ctx.method.service_name, method=ctx.method.name, code=code
        ).inc()


def _codec(ctx: Context) -> str:
    """The codec of a request stream's messages, from its content type (``application/grpc+json``)."""
    content_type = ctx.request_headers.get("content-type", "")
    return CODEC_JSON if content_type.partition(";")[0].endswith("json") else CODEC_PROTO


def client_url(leader: LeaderInfo) -> str:
    """The base URL of the leader's API."""
    assert leader.url is not None
    return leader.url


def _transport() -> HTTPTransport:
    return HTTPTransport(
        http_version=HTTPVersion.HTTP2,
        connect_timeout=CONNECT_TIMEOUT,
        pool_idle_timeout=90.0,
        tcp_keepalive_interval=10.0,
        enable_gzip=False,
        enable_brotli=False,
        enable_zstd=False,
        follow_redirects=False,
        enable_otel=False,
    )
