"""The proxy of every cluster-routed service: authenticate, route, forward to the cluster's agent.

Every method of every service registered as cluster-routed (:mod:`._services`) comes here, through
a :class:`~._passthrough.PassThroughApplication` built from its descriptor. For every call, in
order:

1. the bearer token is verified (unauthenticated / unavailable when the issuer is unreachable);
2. the cluster is read from the raw request (its :class:`~._routes.Route`: field 1 ``cluster``,
   a field path such as ``start.cluster`` in a request stream's first message, or the prefix of
   a self-routing session id): empty is invalid_argument, unknown is not_found, a cluster whose
   agent is not connected is unavailable at once (in-memory state, see :mod:`._tunnels`);
3. the call is re-issued to ``http://127.0.0.1:<tunnel_port>`` over the warm HTTP/2 connection
   with the same procedure, codec and message bytes, the remaining deadline, the request id and
   the identity headers signed for that cluster and procedure. No other client header is
   forwarded, so nothing a client sends as ``X-Otterscale-*`` can reach an agent;
4. the agent's answer goes back as it came: response bytes untouched, error code, message and
   details unchanged. Only a failure to reach the agent at all (the tunnel dropped mid-call)
   becomes the hub's own unavailable, naming the cluster.

Streams (Watch, and any server, client or bidirectional stream) stay streams end to end: each
message is forwarded as it arrives, in both directions (a request stream through a
:class:`~._passthrough.RequestPipe`, so a bidirectional call is full duplex where HTTP/2 carries
it); a client that goes away cancels the hub's handler, which closes the agent stream (HTTP/2
RST_STREAM, so the agent stops its work); an agent that ends the stream ends the client's with the
same status. When the hub shuts down, open streams end with unavailable (a Watch resumes
elsewhere from its last resourceVersion) and new ones are refused; so do they when this replica
stops leading (with leader election only the leader serves this proxy; followers forward, see
:mod:`._forward`).

Limits (:mod:`._limits`): each stream holds one of its subject's ``max_watches_per_subject``
slots from authentication until it ends, however it ends; an agent answer over
``max_response_bytes`` ends the call with resource_exhausted (and is not a tunnel failure).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from prometheus_client import Gauge

from otterscale.common import Identity, OtterscaleError, echo, sign_identity

from ._access import AccessPolicy
from ._auth import Authenticator
from ._codec import RawMessage
from ._errors import (
    AgentUnavailableError,
    MissingClusterError,
    ShuttingDownError,
    UnknownClusterError,
    WatchLimitError,
    to_connect_error,
)
from ._limits import (
    RESPONSE_TOO_LARGE,
    WATCH_LIMIT,
    HubLimits,
    WatchSlots,
    is_response_too_large,
    response_too_large,
)
from ._metrics import HubMetrics
from ._observe import current_call
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
from ._routes import Route
from ._tunnels import ClusterStatus, Tunnels
from ._upstream import AgentClients

logger = logging.getLogger(__name__)

#: The cancellation message that marks the hub's own shutdown of a stream.
SHUTDOWN = "otterscale-hub-shutdown"
#: The cancellation message that marks the end of a stream because this replica stopped leading.
LEADERSHIP_LOST = "otterscale-hub-leadership-lost"


@dataclass(frozen=True, slots=True)
class _Forward:
    """Where and how one call goes: the cluster, its agent client, codec, headers and deadline."""

    cluster: str
    codec: str
    headers: dict[str, str]
    timeout_ms: int | None


class ClusterProxy:
    """The :class:`~._passthrough.Relay` of every cluster-routed service (see the module docstring).

    Served by :class:`~._passthrough.PassThroughApplication`\\ s built from the services'
    descriptors, so routes and stream types always match the .proto files.
    """

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        tunnels: Tunnels,
        agents: AgentClients,
        keys: Mapping[str, bytes],
        metrics: HubMetrics,
        limits: HubLimits | None = None,
        on_unreachable: Callable[[str], None] | None = None,
        access: AccessPolicy | None = None,
    ) -> None:
        self._auth = authenticator
        #: Which clusters each caller may use (``access``); None: everyone, every cluster.
        self._access = access
        self._limits = limits or HubLimits()
        #: Streams open per subject (``limits.max_watches_per_subject`` counts every stream).
        self.watch_slots = WatchSlots(self._limits.max_watches_per_subject)
        self._tunnels = tunnels
        self._agents = agents
        self._keys = dict(keys)
        self._metrics = metrics
        self._on_unreachable = on_unreachable
        self._streams: dict[asyncio.Task[Any], EndableStream] = {}
        self._draining = False

    # ----------------------------------------------------------------------------------------------
    # Shutdown

    @property
    def open_streams(self) -> int:
        """Streams (Watch and every other streaming call) open right now."""
        return len(self._streams)

    def drain(self) -> None:
        """Refuse new streams and end the open ones with unavailable."""
        self._draining = True
        for stream in list(self._streams.values()):
            stream.end(SHUTDOWN)

    def end_streams(self) -> None:
        """End the open streams with unavailable: this replica stopped leading (the tunnels go)."""
        for stream in list(self._streams.values()):
            stream.end(LEADERSHIP_LOST)

    # ----------------------------------------------------------------------------------------------
    # Relay

    async def unary(self, route: Route, request: RawMessage, ctx: Context) -> RawMessage:
        """Forward one unary call to its cluster's agent."""
        try:
            identity = await self._authenticate(ctx)
            forward = self._prepare(route, request, identity, ctx, stream=False)
        except Exception as exc:
            raise self._translate(exc) from None
        cluster = forward.cluster
        started = time.perf_counter()
        try:
            response: RawMessage = await self._agents.client(cluster, forward.codec).execute_unary(
                request=request, method=ctx.method, headers=forward.headers, timeout_ms=forward.timeout_ms
            )
        except ConnectError as exc:
            raise self._upstream_error(route, cluster, exc) from None
        except Exception as exc:
            raise self._translate(exc) from None
        finally:
            self._metrics.agent_roundtrip.labels(cluster=cluster, method=ctx.method.name).observe(
                time.perf_counter() - started
            )
        self._tunnels.seen(cluster)
        return response

    async def stream(self, route: Route, requests: Requests, ctx: Context) -> AsyncIterator[RawMessage]:
        """Forward a streaming call (any of the three shapes) to its cluster's agent."""
        forward: _Forward | None = None
        try:
            identity = await self._authenticate(ctx)
            if isinstance(requests, RawMessage):
                forward = self._prepare(route, requests, identity, ctx, stream=True)
        except Exception as exc:
            raise self._translate(exc) from None
        subject = identity.subject
        try:
            # Taken before a request stream's first message is awaited: a caller cannot hold more
            # open streams than its slots, whether or not they have started.
            self.watch_slots.acquire(subject, route.method)
        except WatchLimitError as exc:
            self._metrics.limit_refusals.labels(reason=WATCH_LIMIT).inc()
            raise to_connect_error(exc) from None
        task = asyncio.current_task()
        assert task is not None
        endable = self._streams[task] = EndableStream(task)
        pipe: RequestPipe | None = None
        gauge: Gauge | None = None
        try:
            if forward is None:
                assert not isinstance(requests, RawMessage)
                pipe = RequestPipe(requests, name=f"hub-requests:{route.procedure}")
                try:
                    first = await pipe.first(route.field)
                    forward = self._prepare(route, first, identity, ctx, stream=True)
                except Exception as exc:
                    raise self._translate(exc) from None
            cluster = forward.cluster
            gauge = self._metrics.watch_active.labels(cluster=cluster)
            gauge.inc()
            try:
                with self._agents.stream_client(cluster, forward.codec) as client:
                    passed = requests if isinstance(requests, RawMessage) else pipe
                    assert passed is not None
                    upstream = pass_on(client, passed, ctx, forward.headers, forward.timeout_ms)
                    try:
                        answered = False
                        async for message in endable.relay(upstream):
                            if not answered:
                                self._tunnels.seen(cluster)
                                answered = True
                            yield message
                    finally:
                        await close_upstream(upstream)
            except ConnectError as exc:
                if (failure := caller_failure(pipe)) is not None:
                    raise failure from None
                raise self._upstream_error(route, cluster, exc, task=task) from None
        except asyncio.CancelledError as exc:
            if _is_shutdown(exc):
                task.uncancel()
                raise self._shutdown_error(route, exc) from None
            raise
        finally:
            self._streams.pop(task, None)
            self.watch_slots.release(subject)
            if gauge is not None:
                gauge.dec()
            if pipe is not None:
                await pipe.close()

    # ----------------------------------------------------------------------------------------------

    async def _authenticate(self, ctx: Context) -> Identity:
        return await self._auth.caller(ctx)

    def _prepare(
        self, route: Route, request: RawMessage, identity: Identity, ctx: Context, *, stream: bool
    ) -> _Forward:
        cluster = route.cluster(request)
        self._route(route, cluster, identity)
        call = current_call()
        if call is not None:
            call.cluster = cluster
        if stream and self._draining:
            raise ShuttingDownError(f"the hub is shutting down; retry {route.again}")
        headers = sign_identity(identity, cluster=cluster, method=route.procedure, key=self._keys[cluster])
        timeout_ms = next_hop_timeout_ms(ctx, "the agent")
        return _Forward(cluster, request.codec, with_request_id(headers), timeout_ms)

    def _route(self, route: Route, cluster: str, identity: Identity) -> ClusterStatus:
        allowed = self._access.allowed(identity) if self._access is not None else None
        if not cluster:
            names = [name for name in self._tunnels.names() if allowed is None or name in allowed]
            raise MissingClusterError(
                f"the request's {route.field} field is empty; configured clusters: {', '.join(names)}"
            )
        status = self._tunnels.get(cluster)
        # A cluster the caller may not use is answered exactly like one that does not exist.
        if status is None or (allowed is not None and cluster not in allowed):
            raise UnknownClusterError(f"cluster {echo(cluster)} is not configured in this hub")
        if not status.connected:
            detail = f"; last error: {status.last_error}" if status.last_error else ""
            raise AgentUnavailableError(
                f"the agent of cluster {cluster!r} is not connected (since {_when(status.since)}){detail}"
            )
        return status

    def _upstream_error(
        self, route: Route, cluster: str, exc: ConnectError, *, task: asyncio.Task[Any] | None = None
    ) -> ConnectError:
        cause = exc.__cause__
        if is_response_too_large(exc):
            # Not a tunnel failure: the agent answered, with more than the hub will hold.
            self._metrics.limit_refusals.labels(reason=RESPONSE_TOO_LARGE).inc()
            return to_connect_error(response_too_large(cluster, self._limits.max_response_bytes))
        if isinstance(cause, asyncio.CancelledError):
            if task is not None and _is_shutdown(cause):
                task.uncancel()
                return self._shutdown_error(route, cause)
            # This handler is being cancelled: the client's deadline passed or the client went
            # away. Let the cancellation go on, so the server answers deadline_exceeded (or
            # canceled) itself, instead of the client library's "Request was cancelled".
            raise cause
        if exc.code is Code.UNAVAILABLE and cause is not None and not isinstance(cause, ConnectError):
            # connectrpc's client reports a transport failure as unavailable with the cause: the
            # agent was never reached (or the tunnel dropped mid-call). Anything else came from
            # the agent and passes through unchanged.
            # The transport's text (loopback addresses, library internals) is for operators: it
            # goes to the log and to ListClusters' last error, not to every caller.
            reason = str(cause) or type(cause).__name__
            call = current_call()
            logger.warning(
                "the agent of cluster %r cannot be reached (request id %s): %s",
                cluster,
                call.request_id if call is not None else None,
                reason,
            )
            self._tunnels.call_failed(cluster, reason)
            if self._on_unreachable is not None:
                self._on_unreachable(cluster)
            return ConnectError(
                Code.UNAVAILABLE,
                f"the agent of cluster {cluster!r} cannot be reached through its tunnel; retry shortly",
            )
        return exc

    def _shutdown_error(self, route: Route, exc: BaseException) -> ConnectError:
        if exc.args == (LEADERSHIP_LOST,):
            return to_connect_error(
                ShuttingDownError(f"this hub replica stopped leading; resume {route.again}")
            )
        return to_connect_error(ShuttingDownError(f"the hub is shutting down; resume {route.again}"))

    def _translate(self, exc: BaseException) -> ConnectError:
        if isinstance(exc, ConnectError | OtterscaleError):
            return to_connect_error(exc)
        call = current_call()
        request_id = call.request_id if call is not None else None
        logger.error("unexpected error in the proxy (request id %s)", request_id, exc_info=exc)
        return to_connect_error(exc, request_id=request_id)


def _is_shutdown(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError) and exc.args in ((SHUTDOWN,), (LEADERSHIP_LOST,))


def _when(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
