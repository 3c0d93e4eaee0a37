"""Routes: for every method of a service, read once from its descriptor, how the hub passes it on.

A :class:`Route` holds what the hub's pass-through needs to know about one method: its
procedure path, its call shape (unary, server stream, client stream, bidirectional) and, for a
cluster-routed service, where the request names its cluster. That comes from the method's
``(otterscale.routing.v1.route)`` option (see ``otterscale/routing/v1/routing.proto``):

- no option: field 1 of the request, which must be ``string cluster = 1``;
- ``{field: "start.cluster"}``: a dotted path of fields to a string (message fields on the way,
  members of a oneof allowed); of a client or bidirectional stream, in its first message;
- ``{session: "session_id"}``: a top-level string holding a self-routing session id,
  ``<cluster>.<22 base64url characters>``; the cluster is the part before the first ``.``.

A service whose method cannot be routed stops the hub at start-up, naming the method: the
mistake shows when the service is registered, not on the first call. Hub-served services (their
calls are answered by the hub itself, and followers only forward them to the leader) have routes
without a cluster.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from google.protobuf.descriptor import (  # type: ignore[import-untyped]  # no stubs for protobuf 7
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from otterscale.routing.v1 import routing_pb2

from ._codec import FieldStep, RawMessage, peek_string
from ._errors import HubError, MalformedRequestError

logger = logging.getLogger(__name__)

#: A self-routing session id: a cluster name (a DNS label, so without a dot), a dot, and 16
#: random bytes in unpadded base64url.
_SESSION_ID = re.compile(r"([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\.[A-Za-z0-9_-]{22}")

_LENGTH_DELIMITED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)
_FIXED64 = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)
_FIXED32 = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32)
_IDEMPOTENCY = {
    1: IdempotencyLevel.NO_SIDE_EFFECTS,
    2: IdempotencyLevel.IDEMPOTENT,
}


class RouteError(HubError):
    """A registered service has a method the hub cannot route (raised at start-up)."""


@dataclass(frozen=True, slots=True)
class Route:
    """How the hub passes on one method's calls (see the module docstring)."""

    #: ``/<package>.<Service>/<Method>``
    procedure: str
    #: What connectrpc serves and calls it with (raw messages in, raw messages out).
    info: MethodInfo[RawMessage, RawMessage]
    #: The fields from the request (the first one of a request stream) to the routing string;
    #: None for a hub-served method.
    path: tuple[FieldStep, ...] | None = None
    #: The routing string is a self-routing session id, not a cluster name.
    session: bool = False
    #: The request carries a ``resource_version`` to resume from (Watch): said in errors that
    #: end such a stream.
    resumable: bool = False

    @property
    def method(self) -> str:
        """The method's name (``Watch``)."""
        return self.info.name

    @property
    def field(self) -> str:
        """The routing field as the .proto names it (``cluster``, ``start.cluster``)."""
        return ".".join(step.name for step in self.path or ())

    @property
    def streams_requests(self) -> bool:
        """The caller sends a stream of messages (client stream, bidirectional)."""
        return self.info.stream_type in (StreamType.CLIENT_STREAM, StreamType.BIDI_STREAM)

    @property
    def streams_responses(self) -> bool:
        """The answer is a stream of messages (server stream, bidirectional)."""
        return self.info.stream_type in (StreamType.SERVER_STREAM, StreamType.BIDI_STREAM)

    @property
    def again(self) -> str:
        """What a caller whose stream was ended should do again: ``the Watch from the last
        resourceVersion``, ``the PodLog call``."""
        if self.resumable:
            return f"the {self.method} from the last resourceVersion"
        return f"the {self.method} call"

    def cluster(self, message: RawMessage) -> str:
        """The cluster ``message`` names ("" when the field is empty).

        Raises :class:`MalformedRequestError` (invalid_argument) for a message that cannot be
        read that far, or a session id of the wrong shape (never echoed: it is a capability).
        """
        if self.path is None:
            raise RouteError(f"{self.procedure} is served by the hub and names no cluster")
        value = peek_string(message, self.path)
        if not self.session:
            return value
        if not value:
            raise MalformedRequestError(f"the request's {self.field} is empty")
        found = _SESSION_ID.fullmatch(value)
        if found is None:
            raise MalformedRequestError(
                f"the request's {self.field} is not a session id (<cluster>.<22 base64url characters>)"
            )
        return found.group(1)


def cluster_routes(service: ServiceDescriptor) -> list[Route]:
    """The routes of a cluster-routed service; :class:`RouteError` names a method without one."""
    return [_route(method, routed=True) for method in service.methods]


def hub_routes(service: ServiceDescriptor) -> list[Route]:
    """The routes of a hub-served service (no cluster: followers forward them to the leader)."""
    return [_route(method, routed=False) for method in service.methods]


def routes_by_procedure(routes: Iterable[Route]) -> Mapping[str, Route]:
    """``routes`` keyed by procedure path."""
    return {route.procedure: route for route in routes}


def method_info(method: MethodDescriptor) -> MethodInfo[RawMessage, RawMessage]:
    """connectrpc's description of ``method`` with raw messages in and out."""
    if method.client_streaming and method.server_streaming:
        stream_type = StreamType.BIDI_STREAM
    elif method.client_streaming:
        stream_type = StreamType.CLIENT_STREAM
    elif method.server_streaming:
        stream_type = StreamType.SERVER_STREAM
    else:
        stream_type = StreamType.UNARY
    return MethodInfo(
        name=method.name,
        service_name=method.containing_service.full_name,
        input=RawMessage,
        output=RawMessage,
        idempotency_level=_IDEMPOTENCY.get(method.GetOptions().idempotency_level, IdempotencyLevel.UNKNOWN),
        stream_type=stream_type,
    )


def _route(method: MethodDescriptor, *, routed: bool) -> Route:
    procedure = f"/{method.containing_service.full_name}/{method.name}"
    info = method_info(method)
    resumable = "resource_version" in method.input_type.fields_by_name
    if not routed:
        return Route(procedure, info, resumable=resumable)
    options = method.GetOptions()
    declared = options.Extensions[routing_pb2.route] if options.HasExtension(routing_pb2.route) else None
    try:
        if declared is None:
            path = _default_path(method.input_type)
            session = False
        elif declared.WhichOneof("by") == "field":
            path = _field_path(method.input_type, declared.field)
            session = False
        elif declared.WhichOneof("by") == "session":
            path = _field_path(method.input_type, declared.session)
            if len(path) != 1:
                raise RouteError(f"the session id must be a top-level field, not {declared.session!r}")
            session = True
        else:
            raise RouteError("its (otterscale.routing.v1.route) option sets neither field nor session")
    except RouteError as exc:
        raise RouteError(f"cannot route {procedure}: {exc}") from None
    return Route(procedure, info, path, session=session, resumable=resumable)


def _default_path(message: Descriptor) -> tuple[FieldStep, ...]:
    field = message.fields_by_number.get(1)
    if field is None or field.name != "cluster" or not _is_single(field, FieldDescriptor.TYPE_STRING):
        raise RouteError(
            f"{message.full_name} has no `string cluster = 1`; declare where the cluster is with the "
            "method option (otterscale.routing.v1.route)"
        )
    return (_step(field),)


def _field_path(message: Descriptor, dotted: str) -> tuple[FieldStep, ...]:
    names = dotted.split(".")
    steps: list[FieldStep] = []
    for depth, name in enumerate(names, 1):
        field = message.fields_by_name.get(name)
        if field is None:
            raise RouteError(f"{message.full_name} has no field {name!r} (route {dotted!r})")
        last = depth == len(names)
        wanted = FieldDescriptor.TYPE_STRING if last else FieldDescriptor.TYPE_MESSAGE
        if not _is_single(field, wanted):
            kind = "a string" if last else "a message"
            raise RouteError(f"{field.full_name} must be {kind}, not repeated (route {dotted!r})")
        steps.append(_step(field))
        if not last:
            message = field.message_type
    return tuple(steps)


def _is_single(field: FieldDescriptor, wanted: int) -> bool:
    return bool(field.type == wanted and not field.is_repeated)


def _step(field: FieldDescriptor) -> FieldStep:
    oneof = field.containing_oneof
    siblings = frozenset(
        (other.number, _wire_type(other))
        for other in (oneof.fields if oneof is not None else ())
        if other.number != field.number
    )
    return FieldStep(field.number, field.name, field.json_name, siblings)


def _wire_type(field: FieldDescriptor) -> int:
    if field.type in _LENGTH_DELIMITED:
        return 2
    if field.type in _FIXED64:
        return 1
    if field.type in _FIXED32:
        return 5
    return 0
