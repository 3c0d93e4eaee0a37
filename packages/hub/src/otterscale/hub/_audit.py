"""The hub's audit trail: exactly one event per audited call, decided by the RPC, not by a handler.

Which calls: every RPC of every service except gRPC health and reflection is audited. The known
reads (:data:`READS`: Discovery, Schema, List, Get, Describe, Watch, ListClusters) only when
``audit.reads`` is ``metadata``; everything else (Create, Apply, Delete, and any RPC added later
that is not listed as a read) always. So a new RPC is audited until someone decides it is a read.

How, with two connectrpc interceptors on the services this replica serves itself (a follower
that only forwards a call writes nothing; the leader that serves it writes the one event):

- :class:`AuditInterceptor`, a metadata interceptor at the front of the chain, writes the event in
  ``on_end``, where the call's final code is known whatever happened (a refused token, an unknown
  cluster, the agent's permission_denied, a deadline, a client that went away), so one call gives
  one event.
- :class:`AuditFields`, a message interceptor, sees the request the pass-through codec kept as
  bytes (:class:`~._codec.RawMessage`) and, for an audited call only, decodes it with the
  generated class of the method's input (``ctx.method.input``, binary or JSON) to record what it
  names: cluster, group, version, resource, namespace, name, dry-run. A field a request type
  lacks stays empty. A Create names its object only in the manifest, which is not parsed here:
  the name (and a namespace the request left empty) is read from the object the call returned.

Who: the subject and groups the authenticator verified (:func:`._observe.current_call`), the
source address (a follower's signed ``X-Otterscale-Forwarded-For`` for forwarded calls) and this
replica's name. Never the manifest, the token, a header value or an error message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from connectrpc.request import RequestContext
from google.protobuf import json_format  # type: ignore[import-untyped]  # no stubs for protobuf 7
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]

from otterscale.common import AuditEvent, AuditKind, AuditLog, AuditTarget
from otterscale.resource.v1 import resource_pb2

from ._codec import CODEC_JSON, RawMessage
from ._observe import code_of, current_call
from ._passthrough import close_upstream

logger = logging.getLogger(__name__)

#: RPCs that only read (``/``-less procedure names); audited only at ``audit.reads: metadata``.
READS = frozenset(
    {
        "otterscale.resource.v1.ResourceService/Discovery",
        "otterscale.resource.v1.ResourceService/Schema",
        "otterscale.resource.v1.ResourceService/List",
        "otterscale.resource.v1.ResourceService/Get",
        "otterscale.resource.v1.ResourceService/Describe",
        "otterscale.resource.v1.ResourceService/Watch",
        "otterscale.cluster.v1.ClusterService/ListClusters",
    }
)
#: Services never audited: probes and tooling that reveal nothing about any cluster.
UNAUDITED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)

# Request fields recorded when the request type has them (same names across request messages).
_TARGET_FIELDS = ("cluster", "group", "version", "resource", "namespace", "name", "dry_run")


def audit_kind(service: str, method: str) -> AuditKind | None:
    """``read``, ``write``, or None for an RPC that is never audited."""
    if service in UNAUDITED_SERVICES:
        return None
    return "read" if f"{service}/{method}" in READS else "write"


def decode_target(message: RawMessage, input_class: type[Message]) -> AuditTarget:
    """The audited fields of a request, decoded with its generated class (empty if undecodable:
    the handler refuses such a request itself)."""
    request = input_class()
    try:
        if message.codec == CODEC_JSON:
            json_format.Parse(message.data, request, ignore_unknown_fields=True)
        else:
            request.ParseFromString(message.data)
    except (DecodeError, json_format.ParseError, ValueError, RecursionError):
        return AuditTarget()
    fields = request.DESCRIPTOR.fields_by_name
    values = {name: getattr(request, name) for name in _TARGET_FIELDS if name in fields}
    return AuditTarget(**values)


def _returned_object(response: object) -> tuple[str, str]:
    """``metadata.name`` and ``metadata.namespace`` of a returned Resource ("" when not one)."""
    if not isinstance(response, RawMessage):
        return "", ""
    try:
        if response.codec == CODEC_JSON:
            document = json.loads(response.data)
            metadata = document.get("object", {}).get("metadata", {}) if isinstance(document, dict) else {}
            if not isinstance(metadata, dict):
                return "", ""
            name, namespace = metadata.get("name", ""), metadata.get("namespace", "")
        else:
            resource = resource_pb2.Resource.FromString(response.data)
            fields = resource.object.fields["metadata"].struct_value.fields
            name, namespace = fields["name"].string_value, fields["namespace"].string_value
    except (DecodeError, ValueError, AttributeError, RecursionError):
        return "", ""
    return (name if isinstance(name, str) else ""), (namespace if isinstance(namespace, str) else "")


class AuditInterceptor:
    """Writes the one audit event of each audited call when it ends (a metadata interceptor)."""

    def __init__(self, log: AuditLog, *, replica: str) -> None:
        self._log = log
        self._replica = replica

    async def on_start(self, ctx: RequestContext[Any, Any]) -> tuple[AuditKind | None, float, float]:
        """Decide whether this call is audited; note when it started."""
        kind = audit_kind(ctx.method.service_name, ctx.method.name)
        if kind is not None and not self._log.wants(kind):
            kind = None
        return kind, time.time(), time.perf_counter()

    async def on_end(
        self,
        token: tuple[AuditKind | None, float, float],
        ctx: RequestContext[Any, Any],
        error: Exception | None,
    ) -> None:
        """Write the event with the call's final code."""
        kind, wall, started = token
        if kind is None:
            return
        call = current_call()
        target = (call.target if call is not None else None) or AuditTarget()
        if not target.cluster and call is not None:
            target.cluster = call.cluster
        self._log.write(
            AuditEvent(
                time=wall,
                component="hub",
                replica=self._replica,
                request_id=call.request_id if call is not None else "",
                subject=call.subject if call is not None else "",
                groups=call.groups if call is not None else (),
                service=ctx.method.service_name,
                verb=ctx.method.name,
                target=target,
                code=code_of(error),
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                source=(call.source if call is not None else "") or ctx.client_address or "",
                forwarded_by=call.forwarded_by if call is not None else "",
            )
        )


class AuditFields:
    """Records what an audited request names on the running call (a message interceptor)."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def _record(self, request: Any, ctx: RequestContext[Any, Any]) -> AuditTarget | None:
        kind = audit_kind(ctx.method.service_name, ctx.method.name)
        call = current_call()
        if kind is None or call is None or not self._log.wants(kind) or not isinstance(request, RawMessage):
            return None
        call.target = decode_target(request, ctx.method.input)
        return call.target

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        target = self._record(request, ctx)
        response = await call_next(request, ctx)
        if target is not None and not target.name and ctx.method.output is resource_pb2.Resource:
            name, namespace = _returned_object(response)
            target.name = name
            target.namespace = target.namespace or namespace
        return response

    async def intercept_server_stream(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[Any]:
        self._record(request, ctx)
        stream = call_next(request, ctx)
        try:
            async for message in stream:
                yield message
        finally:
            await close_upstream(stream)
