"""One log line and one metric sample per RPC, with a request id that follows the call.

:class:`ObservingInterceptor` is the first interceptor of every hub service. connectrpc runs it
before the request body is read and ends it after the status is known, so duration and code
include everything (authentication, routing, the agent, the deadline). It never raises: a
request is rejected by the handlers (after the body was read; answering an HTTP/2 request
before its body has arrived trips hypercorn 0.18).

The request id is the caller's ``X-Request-Id`` when it is short and plain, else a new one; it
is returned in the ``X-Request-Id`` response header and sent to the agent. Handlers fill in the
cluster, and the authenticator the subject and groups, through :func:`current_call` (the audit
trail, :mod:`._audit`, reads the same record).

Log fields: ``request_id``, ``method`` (``/package.Service/Method``), ``cluster``, ``subject``,
``code`` (``ok`` or a Connect code), ``duration_ms``, ``peer``, and ``forwarded_by`` (the
follower replica, for a call that one forwarded to this leader; the header is trusted only when
another replica signed it, see :mod:`._replicas`). Never a header value besides the request id
and that replica name: no token, no signature.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connectrpc.errors import ConnectError
from connectrpc.method import StreamType
from connectrpc.request import RequestContext

from otterscale.common import Identity

from ._metrics import HubMetrics

if TYPE_CHECKING:
    from collections.abc import Mapping

    from otterscale.common import AuditClusterOutcome, AuditTarget

logger = logging.getLogger("otterscale.hub.access")

REQUEST_ID_HEADER = "x-request-id"
#: Set by a follower on every call it forwards to the leader (the hop guard, see ``_forward``).
FORWARDED_BY_HEADER = "x-otterscale-forwarded-by"
#: The caller's address as the forwarding follower saw it (signed with the header above).
FORWARDED_FOR_HEADER = "x-otterscale-forwarded-for"
_QUIET_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_REPLICA_RE = re.compile(r"[A-Za-z0-9._:-]{1,253}")


@dataclass(slots=True)
class CallInfo:
    """What is known about the running call; handlers add the cluster, the authenticator the
    caller, the audit trail what the request names (``target``)."""

    request_id: str
    service: str
    method: str
    started: float
    cluster: str = ""
    subject: str = ""
    groups: tuple[str, ...] = ()
    forwarded_by: str = ""
    #: The caller's address: the TCP peer, or for a forwarded call the one the follower saw.
    source: str = ""
    target: AuditTarget | None = None
    #: The verified caller, once authenticated (before the request body is read, see ``_auth``).
    identity: Identity | None = None
    #: Per cluster, how a call that reaches many (fan-out) ended there; set by its handler.
    clusters: Mapping[str, AuditClusterOutcome] | None = None


_CALL: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("otterscale_hub_call", default=None)


def current_call() -> CallInfo | None:
    """The running call's info (None outside an RPC)."""
    return _CALL.get()


class ObservingInterceptor:
    """A connectrpc metadata interceptor: request id, access log and RPC metrics."""

    def __init__(self, metrics: HubMetrics, *, slow_seconds: float = 1.0) -> None:
        self._metrics = metrics
        self._slow = slow_seconds

    async def on_start(self, ctx: RequestContext[Any, Any]) -> CallInfo:
        """Start timing; pick the request id; make the call info visible to the handler."""
        supplied = ctx.request_headers.get(REQUEST_ID_HEADER, "")
        request_id = supplied if _REQUEST_ID_RE.fullmatch(supplied) else uuid.uuid4().hex
        forwarded_by = _replica_name(ctx.request_headers.get(FORWARDED_BY_HEADER, ""))
        forwarded_for = ctx.request_headers.get(FORWARDED_FOR_HEADER, "") if forwarded_by else ""
        info = CallInfo(
            request_id=request_id,
            service=ctx.method.service_name,
            method=ctx.method.name,
            started=time.perf_counter(),
            forwarded_by=forwarded_by,
            source=forwarded_for or ctx.client_address or "",
        )
        _CALL.set(info)
        ctx.response_headers[REQUEST_ID_HEADER] = request_id
        return info

    async def on_end(self, info: CallInfo, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        """Count, time and log the call."""
        elapsed = time.perf_counter() - info.started
        code = code_of(error)
        self._metrics.rpc_handled.labels(service=info.service, method=info.method, code=code).inc()
        self._metrics.rpc_duration.labels(service=info.service, method=info.method, code=code).observe(
            elapsed
        )
        # Probes (gRPC health) and tooling (reflection) that succeed are logged at DEBUG only.
        level = logging.DEBUG if error is None and info.service in _QUIET_SERVICES else logging.INFO
        if not logger.isEnabledFor(level):
            return
        fields = {
            "request_id": info.request_id,
            "method": f"/{info.service}/{info.method}",
            "cluster": info.cluster,
            "subject": info.subject,
            "code": code,
            "duration_ms": round(elapsed * 1000, 3),
            "peer": ctx.client_address or "",
        }
        if info.forwarded_by:
            fields["forwarded_by"] = info.forwarded_by
        if error is not None and code in ("internal", "unknown"):
            logger.warning("rpc failed: %s", _error_text(error), extra=fields)
        elif error is not None and code != "canceled":
            logger.info("rpc %s: %s", code, _error_text(error), extra=fields)
        elif elapsed >= self._slow and ctx.method.stream_type is StreamType.UNARY:  # streams are long
            logger.info("rpc %s (slow)", code, extra=fields)
        else:
            logger.log(level, "rpc %s", code, extra=fields)


def code_of(error: Exception | None) -> str:
    """The Connect code a call ended with, as its lower-case name (``ok`` without an error)."""
    if error is None:
        return "ok"
    if isinstance(error, ConnectError):
        return error.code.value
    return "unknown"


def _replica_name(value: str) -> str:
    """The forwarding replica's name for the log (a Pod name); anything else is not echoed."""
    if not value:
        return ""
    return value if _REPLICA_RE.fullmatch(value) else "(invalid)"


def _error_text(error: Exception) -> str:
    return error.message if isinstance(error, ConnectError) else type(error).__name__
