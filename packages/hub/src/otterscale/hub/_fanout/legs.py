"""One leg of a fan-out call: a ResourceService List or Watch sent to one cluster's agent as the caller.

This is the fan-out's only door to the hub's plumbing (:class:`AgentLegs`): whether a cluster's
agent is connected (the tunnels' in-memory state: a disconnected cluster is never dialled), and
issuing the call through the warm HTTP/2 connection of that agent's tunnel with the identity
headers signed for that cluster and procedure, the request id, the leg's deadline and, for List,
the leg's share of the page's bytes. Agents see an ordinary List or Watch from the caller and
need no change.

Failures become a :class:`LegFailure` carrying the cluster's typed outcome (:func:`classify`):
what the agent answered maps like Kubernetes reasons map to Connect codes, a transport failure is
the hub's own "cannot be reached" (its detail goes to the log, not to the caller), a deadline is
TIMEOUT. Messages come only from that cluster's answer and are cut to :data:`MESSAGE_LIMIT`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType

from otterscale.common import Identity, sign_identity
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.multicluster_pb2 import ClusterStatus

from .._codec import RawMessage
from .._limits import CALL_RESPONSE_LIMIT, is_response_too_large
from .._metrics import HubMetrics
from .._passthrough import close_upstream, with_request_id
from .._tunnels import Tunnels
from .._upstream import AgentClients

logger = logging.getLogger(__name__)

Outcome = ClusterStatus.Outcome

SERVICE = "otterscale.resource.v1.ResourceService"
LIST_METHOD: MethodInfo[Any, Any] = MethodInfo(
    name="List",
    service_name=SERVICE,
    input=pb.ListRequest,
    output=pb.ListResponse,
    idempotency_level=IdempotencyLevel.UNKNOWN,
    stream_type=StreamType.UNARY,
)
WATCH_METHOD: MethodInfo[Any, Any] = MethodInfo(
    name="Watch",
    service_name=SERVICE,
    input=pb.WatchRequest,
    output=pb.WatchEvent,
    idempotency_level=IdempotencyLevel.UNKNOWN,
    stream_type=StreamType.SERVER_STREAM,
)
#: Longest per-cluster message shown to the caller.
MESSAGE_LIMIT = 200
#: Kubernetes' message for a continue token whose snapshot was compacted away (HTTP 410, reason
#: Expired, which api.md maps to invalid_argument): a leg outcome of its own.
_EXPIRED_CONTINUE = "continue parameter is too old"

#: Outcomes after which asking the same cluster again soon may succeed.
RETRYABLE = frozenset(
    {
        Outcome.OUTCOME_UNAVAILABLE,
        Outcome.OUTCOME_TIMEOUT,
        Outcome.OUTCOME_THROTTLED,
        Outcome.OUTCOME_NOT_ATTEMPTED,
    }
)

_CODE_OUTCOMES: Mapping[Code, int] = {
    Code.PERMISSION_DENIED: Outcome.OUTCOME_FORBIDDEN,
    Code.NOT_FOUND: Outcome.OUTCOME_NOT_SERVED,
    Code.UNAVAILABLE: Outcome.OUTCOME_UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: Outcome.OUTCOME_TIMEOUT,
    Code.RESOURCE_EXHAUSTED: Outcome.OUTCOME_THROTTLED,
    Code.INVALID_ARGUMENT: Outcome.OUTCOME_INVALID,
    Code.UNAUTHENTICATED: Outcome.OUTCOME_UNAUTHENTICATED,
}


class LegFailure(Exception):
    """A leg did not succeed: the cluster's outcome, a short message, the agent's code if any."""

    def __init__(self, outcome: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.code = code

    @property
    def retryable(self) -> bool:
        """Whether asking the cluster again soon may succeed."""
        return self.outcome in RETRYABLE


class ResponseTooLarge(Exception):
    """A List leg's answer is larger than the leg's byte share (ask again for fewer items)."""


def short(text: str) -> str:
    """``text`` cut to :data:`MESSAGE_LIMIT` characters."""
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def classify(cluster: str, exc: ConnectError) -> LegFailure:
    """The outcome of an agent's error answer (not a transport failure, see :meth:`AgentLegs`)."""
    outcome = _CODE_OUTCOMES.get(exc.code, Outcome.OUTCOME_ERROR)
    if outcome == Outcome.OUTCOME_INVALID and _EXPIRED_CONTINUE in exc.message:
        outcome = Outcome.OUTCOME_EXPIRED
    return LegFailure(outcome, short(exc.message), exc.code.value)


def unreachable(cluster: str) -> LegFailure:
    """The outcome of a leg whose agent could not be reached through its tunnel."""
    return LegFailure(
        Outcome.OUTCOME_UNAVAILABLE, f"the agent of cluster {cluster!r} cannot be reached through its tunnel"
    )


def not_connected(cluster: str) -> LegFailure:
    """The outcome of a leg not even tried: the hub knows the agent is not connected."""
    return LegFailure(Outcome.OUTCOME_UNAVAILABLE, f"the agent of cluster {cluster!r} is not connected")


def timed_out(seconds: float) -> LegFailure:
    """The outcome of a leg that did not finish within its time."""
    return LegFailure(Outcome.OUTCOME_TIMEOUT, f"no answer within {seconds:.3g}s")


def transport_failure(exc: ConnectError) -> str | None:
    """Why the agent was not reached at all (connectrpc's unavailable with a transport cause), or None.

    connectrpc's client reports a transport failure as unavailable caused by a non-Connect
    exception; anything else is an answer from the agent.
    """
    cause = exc.__cause__
    if exc.code is Code.UNAVAILABLE and cause is not None and not isinstance(cause, ConnectError):
        return str(cause).strip() or type(cause).__name__
    return None


def _reraise_cancellation(exc: ConnectError) -> None:
    """connectrpc's client reports the cancellation of the calling task as a "canceled" error;
    the cancellation itself must go on (the leg is being stopped, or its caller went away)."""
    if isinstance(exc.__cause__, asyncio.CancelledError):
        raise exc.__cause__


class AgentLegs:
    """Sends legs to agents (see the module docstring)."""

    def __init__(
        self,
        *,
        tunnels: Tunnels,
        agents: AgentClients,
        keys: Mapping[str, bytes],
        metrics: HubMetrics,
        on_unreachable: Callable[[str], None] | None = None,
    ) -> None:
        self._tunnels = tunnels
        self._agents = agents
        self._keys = dict(keys)
        self._metrics = metrics
        self._on_unreachable = on_unreachable

    def connected(self, cluster: str) -> bool:
        """Whether ``cluster``'s agent is connected now (in-memory, no network)."""
        status = self._tunnels.get(cluster)
        return status is not None and status.connected

    async def wait_changed(self) -> None:
        """Return at the next change of any cluster's connection state."""
        await self._tunnels.wait_changed()

    def _headers(self, identity: Identity, cluster: str, method: MethodInfo[Any, Any]) -> dict[str, str]:
        procedure = f"/{method.service_name}/{method.name}"
        return with_request_id(
            sign_identity(identity, cluster=cluster, method=procedure, key=self._keys[cluster])
        )

    def _unreachable(self, cluster: str, reason: str) -> LegFailure:
        logger.warning("fan-out leg: the agent of cluster %r cannot be reached: %s", cluster, reason)
        self._tunnels.call_failed(cluster, reason)
        if self._on_unreachable is not None:
            self._on_unreachable(cluster)
        return unreachable(cluster)

    async def list(
        self, cluster: str, identity: Identity, request: RawMessage, *, within: float, max_bytes: int
    ) -> bytes:
        """The agent's ListResponse bytes (in ``request.codec``).

        Raises :class:`LegFailure` (TIMEOUT after ``within`` seconds), or :class:`ResponseTooLarge`
        past ``max_bytes``.
        """
        if not self.connected(cluster):
            raise not_connected(cluster)
        headers = self._headers(identity, cluster, LIST_METHOD)
        client = self._agents.client(cluster, request.codec)
        started = time.perf_counter()
        token = CALL_RESPONSE_LIMIT.set(max_bytes)
        timer = asyncio.timeout(within)
        try:
            async with timer:
                response: RawMessage = await client.execute_unary(
                    request=request,
                    method=LIST_METHOD,
                    headers=headers,
                    timeout_ms=max(1, int(within * 1000)),
                )
        except TimeoutError:
            raise timed_out(within) from None
        except ConnectError as exc:
            if timer.expired():  # connectrpc turned our timeout's cancellation into "canceled"
                raise timed_out(within) from None
            _reraise_cancellation(exc)
            if is_response_too_large(exc):
                raise ResponseTooLarge() from None
            reason = transport_failure(exc)
            if reason is not None:
                raise self._unreachable(cluster, reason) from None
            raise classify(cluster, exc) from None
        finally:
            CALL_RESPONSE_LIMIT.reset(token)
            self._metrics.agent_roundtrip.labels(cluster=cluster, method="MultiList").observe(
                time.perf_counter() - started
            )
        self._tunnels.seen(cluster)
        return response.data

    @asynccontextmanager
    async def watch(
        self, cluster: str, identity: Identity, request: RawMessage
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open ``cluster``'s Watch; yields its events' bytes. Failures raise :class:`LegFailure`.

        Leaving the context closes the agent's stream at once (HTTP/2 RST_STREAM).
        """
        if not self.connected(cluster):
            raise not_connected(cluster)
        headers = self._headers(identity, cluster, WATCH_METHOD)
        with self._agents.stream_client(cluster, request.codec) as client:
            upstream = client.execute_server_stream(request=request, method=WATCH_METHOD, headers=headers)

            async def events() -> AsyncIterator[bytes]:
                try:
                    async for message in upstream:
                        yield message.data
                except ConnectError as exc:
                    _reraise_cancellation(exc)
                    reason = transport_failure(exc)
                    if reason is not None:
                        raise self._unreachable(cluster, reason) from None
                    raise classify(cluster, exc) from None

            try:
                yield events()
            finally:
                await close_upstream(upstream)
