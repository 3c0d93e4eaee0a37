"""The hub's audit trail: exactly one event per audited call, decided by the RPC, not by a handler.

Which calls: every method of every service the hub registers (:mod:`._services`, cluster-routed
and hub-served alike), read once from the services' descriptors (:func:`audited_methods`). A
method is a *read* when its .proto says ``option idempotency_level = NO_SIDE_EFFECTS`` or the
registry lists it in :data:`._services.READ_METHODS` (Discovery, Schema, List, Get, Describe,
Watch); reads are audited only when ``audit.reads`` is ``metadata``. Every other method is a
*write* and always audited: Create, Apply, Delete, and any RPC added later (exec, port-forward,
scale, restart, a fan-out service) until someone declares it a read. gRPC health and reflection
are no registered service: never audited.

How, with two connectrpc interceptors (:meth:`AuditTrail.interceptors`) on the applications this
replica serves itself (a follower that only forwards a call writes nothing; the leader that
serves it writes the one event):

- :class:`AuditInterceptor`, a metadata interceptor at the front of the chain, writes the event in
  ``on_end``, where the call's final code is known whatever happened (a refused token, an unknown
  cluster, the agent's permission_denied, a deadline, a client that went away), so one call gives
  one event.
- :class:`AuditFields`, a message interceptor, records what an audited request names: cluster,
  group, version, resource, namespace, name, dry-run, the fields of those names that the request
  has (a field a request type lacks stays empty). A pass-through request (the bytes the codec kept,
  :class:`~._codec.RawMessage`) is decoded with the generated class of the method's input, binary
  or JSON; a hub-served application's request is already a message. Of a request stream (client
  or bidirectional), the first message names the target, in the message that holds the routing
  field (``start`` of a method routed by ``start.cluster``). A call routed by a session id names
  only its cluster (the proxy records it). A Create names its object only in the manifest, which
  is not parsed here: when the answer carries the object (a ``google.protobuf.Struct object``
  field, as ``Resource`` does), its name (and a namespace the request left empty) is read from it.

A call that reaches many clusters (MultiList, MultiWatch) names its resource in a nested
``query`` and its clusters by selection: its handler records the target and, per cluster, how
that cluster's part ended (``CallInfo.clusters``) before the call ends, and the event carries them.

Who: the subject and groups the authenticator verified (:func:`._observe.current_call`), the
source address (a follower's signed ``X-Otterscale-Forwarded-For`` for forwarded calls) and this
replica's name. Never the manifest, the token, a header value or an error message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from connectrpc.interceptor import Interceptor
from connectrpc.request import RequestContext
from google.protobuf import descriptor_pb2, json_format, message_factory  # type: ignore[import-untyped]
from google.protobuf.descriptor import (  # type: ignore[import-untyped]  # no stubs for protobuf 7
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]

from otterscale.common import AuditEvent, AuditKind, AuditLog, AuditTarget

from ._codec import CODEC_JSON, RawMessage
from ._observe import CallInfo, code_of, current_call
from ._routes import Route

logger = logging.getLogger(__name__)

#: Request fields recorded when the request has them as a single string (same names everywhere).
_STRING_FIELDS = ("cluster", "group", "version", "resource", "namespace", "name")
_NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.IdempotencyLevel.Value("NO_SIDE_EFFECTS")
_STRUCT = "google.protobuf.Struct"


@dataclass(frozen=True, slots=True)
class AuditedMethod:
    """How one method is audited (built from its descriptor, see the module docstring)."""

    kind: AuditKind
    #: The generated class of the request.
    request: type[Message]
    #: Message fields from the request (a request stream's first message) to the message that
    #: names the target: () for the request itself, ``("start",)`` for a route ``start.cluster``.
    within: tuple[str, ...] = ()
    #: The generated class of the answer when it carries the object (``Struct object``), else None.
    returns: type[Message] | None = None

    def target(self, request: object) -> AuditTarget:
        """What ``request`` names (empty when it cannot be decoded: the handler refuses it)."""
        message = _decoded(request, self.request)
        for name in self.within:
            if message is None:
                break
            field = message.DESCRIPTOR.fields_by_name.get(name)
            message = getattr(message, name) if _single(field, FieldDescriptor.TYPE_MESSAGE) else None
        if message is None:
            return AuditTarget()
        fields = message.DESCRIPTOR.fields_by_name
        values: dict[str, Any] = {
            name: getattr(message, name)
            for name in _STRING_FIELDS
            if _single(fields.get(name), FieldDescriptor.TYPE_STRING)
        }
        if _single(fields.get("dry_run"), FieldDescriptor.TYPE_BOOL):
            values["dry_run"] = message.dry_run
        return AuditTarget(**values)

    def returned(self, response: object) -> tuple[str, str]:
        """``metadata.name`` and ``metadata.namespace`` of the object an answer carries ("")."""
        if self.returns is None:
            return "", ""
        message = _decoded(response, self.returns)
        if message is None:
            return "", ""
        metadata = message.object.fields.get("metadata")
        if metadata is None or metadata.WhichOneof("kind") != "struct_value":
            return "", ""
        fields = metadata.struct_value.fields
        return _string(fields.get("name")), _string(fields.get("namespace"))


def audited_methods(
    services: Iterable[tuple[ServiceDescriptor, Iterable[Route]]], *, reads: Collection[str]
) -> dict[str, AuditedMethod]:
    """Every method of ``services`` (each with its routes), keyed by procedure; ``reads`` are the
    procedures declared reads besides those marked NO_SIDE_EFFECTS."""
    methods: dict[str, AuditedMethod] = {}
    for service, routes in services:
        paths = {route.procedure: route.path for route in routes}
        for method in service.methods:
            procedure = f"/{service.full_name}/{method.name}"
            path = paths.get(procedure) or ()
            methods[procedure] = AuditedMethod(
                kind="read" if procedure in reads or _no_side_effects(method) else "write",
                request=message_factory.GetMessageClass(method.input_type),
                within=tuple(step.name for step in path[:-1]),
                returns=message_factory.GetMessageClass(method.output_type)
                if _carries_object(method.output_type)
                else None,
            )
    return methods


class AuditTrail:
    """What this replica audits (:func:`audited_methods`), where it writes, and under what name."""

    def __init__(self, log: AuditLog, methods: Mapping[str, AuditedMethod], *, replica: str) -> None:
        self.log = log
        self.replica = replica
        self._methods = dict(methods)

    def method(self, ctx: RequestContext[Any, Any]) -> AuditedMethod | None:
        """How the running call is audited; None when it is not (not registered, or a read while
        reads are not audited)."""
        method = self._methods.get(f"/{ctx.method.service_name}/{ctx.method.name}")
        if method is None or not self.log.wants(method.kind):
            return None
        return method

    def interceptors(self) -> tuple[Interceptor, ...]:
        """The interceptors that write the trail, to put after the observing one (which sets up
        :func:`._observe.current_call`)."""
        return (AuditInterceptor(self), AuditFields(self))

    def refusals(self) -> Interceptor:
        """A follower's: the event of a call it refuses itself (unauthenticated, from the headers,
        before forwarding), which the leader never sees; what it forwards, the leader audits."""
        return AuditInterceptor(self, refusals_only=True)

    def close(self) -> None:
        """Flush and close the sink (idempotent)."""
        self.log.close()


class AuditInterceptor:
    """Writes the one audit event of each audited call when it ends (a metadata interceptor)."""

    def __init__(self, trail: AuditTrail, *, refusals_only: bool = False) -> None:
        self._trail = trail
        self._refusals_only = refusals_only

    async def on_start(self, ctx: RequestContext[Any, Any]) -> tuple[bool, float, float]:
        """Decide whether this call is audited; note when it started."""
        return self._trail.method(ctx) is not None, time.time(), time.perf_counter()

    async def on_end(
        self, token: tuple[bool, float, float], ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Write the event with the call's final code."""
        audited, wall, started = token
        if not audited:
            return
        code = code_of(error)
        if self._refusals_only and code != "unauthenticated":
            return
        call = current_call()
        target = (call.target if call is not None else None) or AuditTarget()
        if not target.cluster and call is not None:
            target.cluster = call.cluster  # a session-routed call names its cluster only so
        self._trail.log.write(
            AuditEvent(
                time=wall,
                component="hub",
                replica=self._trail.replica,
                request_id=call.request_id if call is not None else "",
                subject=call.subject if call is not None else "",
                groups=call.groups if call is not None else (),
                service=ctx.method.service_name,
                verb=ctx.method.name,
                target=target,
                code=code,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                source=(call.source if call is not None else "") or ctx.client_address or "",
                forwarded_by=call.forwarded_by if call is not None else "",
                clusters=(call.clusters if call is not None else None) or {},
            )
        )


class AuditFields:
    """Records what an audited request names on the running call (a message interceptor of every
    call shape)."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def _audited(self, ctx: RequestContext[Any, Any]) -> tuple[AuditedMethod, CallInfo] | None:
        method = self._trail.method(ctx)
        call = current_call()
        if method is None or call is None:
            return None
        return method, call

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        audited = self._audited(ctx)
        if audited is None:
            return await call_next(request, ctx)
        method, call = audited
        call.target = method.target(request)
        response = await call_next(request, ctx)
        _name_returned(method, call.target, response)
        return response

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[Any], RequestContext[Any, Any]], Awaitable[Any]],
        requests: AsyncIterator[Any],
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        audited = self._audited(ctx)
        if audited is None:
            return await call_next(requests, ctx)
        method, call = audited
        response = await call_next(_first_recorded(requests, method, call), ctx)
        if call.target is not None:
            _name_returned(method, call.target, response)
        return response

    def intercept_server_stream(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[Any]:
        audited = self._audited(ctx)
        if audited is not None:
            method, call = audited
            call.target = method.target(request)
        return call_next(request, ctx)

    def intercept_bidi_stream(
        self,
        call_next: Callable[[AsyncIterator[Any], RequestContext[Any, Any]], AsyncIterator[Any]],
        requests: AsyncIterator[Any],
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[Any]:
        audited = self._audited(ctx)
        return call_next(requests if audited is None else _first_recorded(requests, *audited), ctx)


async def _first_recorded(
    requests: AsyncIterator[Any], method: AuditedMethod, call: CallInfo
) -> AsyncIterator[Any]:
    """``requests`` unchanged; the first one's target recorded on ``call`` as it passes.

    Read wherever the handler reads the stream (a relay reads it in a task of its own), so the
    record goes to ``call`` itself, not through the context of whoever reads.
    """
    first = True
    async for request in requests:
        if first:
            first = False
            call.target = method.target(request)
        yield request


def _name_returned(method: AuditedMethod, target: AuditTarget, response: object) -> None:
    """A request that named no object (Create): the name of the object the call returned."""
    if target.name or method.returns is None:
        return
    name, namespace = method.returned(response)
    target.name = name
    target.namespace = target.namespace or namespace


def _decoded(message: object, message_class: type[Message]) -> Message | None:
    """``message`` as a ``message_class`` (decoding pass-through bytes); None if it is not one."""
    if isinstance(message, RawMessage):
        decoded = message_class()
        try:
            if message.codec == CODEC_JSON:
                json_format.Parse(message.data, decoded, ignore_unknown_fields=True)
            else:
                decoded.ParseFromString(message.data)
        except (DecodeError, json_format.ParseError, ValueError, RecursionError):
            return None
        return decoded
    if isinstance(message, message_class):
        return message
    return None


def _single(field: FieldDescriptor | None, wanted: int) -> bool:
    return field is not None and field.type == wanted and not field.is_repeated


def _no_side_effects(method: MethodDescriptor) -> bool:
    return bool(method.GetOptions().idempotency_level == _NO_SIDE_EFFECTS)


def _carries_object(message: Descriptor) -> bool:
    field = message.fields_by_name.get("object")
    return _single(field, FieldDescriptor.TYPE_MESSAGE) and field.message_type.full_name == _STRUCT


def _string(value: Any) -> str:
    """A ``google.protobuf.Value``'s string ("" when absent or not a string)."""
    if value is None or value.WhichOneof("kind") != "string_value":
        return ""
    return str(value.string_value)
