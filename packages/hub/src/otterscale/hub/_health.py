"""gRPC health checking (``grpc.health.v1.Health``) that reports the hub's real state.

Why hand-written: the messages come from a descriptor built here (the upstream
``grpc/health/v1/health.proto``, same file name, package and field numbers), registered in the
protobuf default pool. Generating it under ``packages/proto`` would create a ``grpc`` Python
package that clashes with grpcio's, and ``grpcio-health-checking`` would pull the whole grpcio
runtime into the hub for three small messages. ``List`` (added upstream in 2024) is left out;
``Check`` and ``Watch`` are what probes and grpcurl use.

Services and their status:

- ``""`` (the server as a whole) and every cluster-routed service
  (``otterscale.resource.v1.ResourceService``, ...): SERVING while the hub runs, its tunnel server
  is up and it is not shutting down; NOT_SERVING otherwise. With leader election a follower has no
  tunnel server and is SERVING while it runs (it forwards);
- every hub-served service (``otterscale.cluster.v1.ClusterService``, ...), ``grpc.health.v1.Health``
  and the reflection services: SERVING while the hub runs and is not shutting down;
- ``otterscale.cluster.v1.Cluster/<name>``: SERVING while cluster ``<name>``'s agent is connected
  to this replica; with leader election only the leader's answer means anything (followers have
  no tunnels; ClusterService, which they forward, answers the same everywhere). Only on the
  management address (``clusters=True``): on the API's address, where anyone may ask without a
  token, it is not_found like any unknown service, so the cluster names cannot be enumerated;
- anything else: ``Check`` answers not_found, ``Watch`` streams SERVICE_UNKNOWN (as the spec says).

``Watch`` sends the current status, then every change, and ends when the hub shuts down (after
sending NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from connectrpc.code import Code
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError
from connectrpc.interceptor import Interceptor
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped]
from google.protobuf.descriptor import FileDescriptor  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]

from ._tunnels import Tunnels

logger = logging.getLogger(__name__)

HEALTH_FILE = "grpc/health/v1/health.proto"
HEALTH_SERVICE = "grpc.health.v1.Health"
CLUSTER_PREFIX = "otterscale.cluster.v1.Cluster/"
RESOURCE_SERVICE = "otterscale.resource.v1.ResourceService"
_OWN_SERVICES = (
    HEALTH_SERVICE,
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)

UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = 0, 1, 2, 3


def _health_file_proto() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name=HEALTH_FILE, package="grpc.health.v1", syntax="proto3")
    f.options.java_package = "io.grpc.health.v1"
    f.options.go_package = "google.golang.org/grpc/health/grpc_health_v1"
    request = f.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        json_name="service",
    )
    response = f.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for name, number in (("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2), ("SERVICE_UNKNOWN", 3)):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        json_name="status",
    )
    service = f.service.add(name="Health")
    service.method.add(
        name="Check",
        input_type=".grpc.health.v1.HealthCheckRequest",
        output_type=".grpc.health.v1.HealthCheckResponse",
    )
    service.method.add(
        name="Watch",
        input_type=".grpc.health.v1.HealthCheckRequest",
        output_type=".grpc.health.v1.HealthCheckResponse",
        server_streaming=True,
    )
    return f


def health_file() -> FileDescriptor:
    """The ``grpc/health/v1/health.proto`` descriptor in the default pool (added once)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(HEALTH_FILE)
    except KeyError:
        pool.Add(_health_file_proto())
        return pool.FindFileByName(HEALTH_FILE)


_FILE = health_file()
HealthCheckRequest: type[Message] = message_factory.GetMessageClass(
    _FILE.message_types_by_name["HealthCheckRequest"]
)
HealthCheckResponse: type[Message] = message_factory.GetMessageClass(
    _FILE.message_types_by_name["HealthCheckResponse"]
)


class HealthService:
    """Answers Check and Watch from the hub's state (see the module docstring)."""

    def __init__(
        self,
        tunnels: Tunnels,
        *,
        serving: Callable[[], bool],
        resources_serving: Callable[[], bool] | None = None,
        routed: Iterable[str] = (RESOURCE_SERVICE,),
        served: Iterable[str] = ("otterscale.cluster.v1.ClusterService",),
        clusters: bool = True,
    ) -> None:
        self._tunnels = tunnels
        self._serving = serving
        self._resources_serving = resources_serving
        self._routed = frozenset(("", *routed))
        self._served = frozenset((*_OWN_SERVICES, *served))
        self._clusters = clusters
        self._closing = False
        self._closed = asyncio.Event()

    def status(self, service: str) -> int:
        """The serving status of ``service`` (SERVICE_UNKNOWN when there is no such service)."""
        up = self._serving() and not self._closing
        if service in self._routed:
            if self._resources_serving is not None:
                return SERVING if up and self._resources_serving() else NOT_SERVING
            return SERVING if up and self._tunnels.server_up else NOT_SERVING
        if service in self._served:
            return SERVING if up else NOT_SERVING
        if service.startswith(CLUSTER_PREFIX) and self._clusters:
            cluster = self._tunnels.get(service[len(CLUSTER_PREFIX) :])
            if cluster is None:
                return SERVICE_UNKNOWN
            return SERVING if up and cluster.connected else NOT_SERVING
        return SERVICE_UNKNOWN

    def close(self) -> None:
        """The hub is shutting down: report NOT_SERVING and end every Watch."""
        self._closing = True
        self._closed.set()

    async def check(self, request: Any, ctx: RequestContext[Any, Any]) -> Any:
        """The current status of ``request.service``; not_found for an unknown service."""
        status = self.status(request.service)
        if status == SERVICE_UNKNOWN:
            raise ConnectError(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return HealthCheckResponse(status=status)

    async def watch(self, request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        """The current status, then each change, until the hub shuts down."""
        last: int | None = None
        while True:
            changed = asyncio.ensure_future(self._tunnels.wait_changed())
            status = self.status(request.service)
            if status != last:
                last = status
                yield HealthCheckResponse(status=status)
            if self._closing:
                changed.cancel()
                return
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait({changed, closed}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                closed.cancel()


class HealthASGIApplication(ConnectASGIApplication[HealthService]):
    """Serves ``grpc.health.v1.Health`` (Connect, gRPC and gRPC-Web)."""

    def __init__(self, service: HealthService, *, interceptors: tuple[Interceptor, ...] = ()) -> None:
        def endpoints(svc: HealthService) -> dict[str, Any]:
            def info(name: str, stream_type: StreamType) -> MethodInfo[Any, Any]:
                return MethodInfo(
                    name=name,
                    service_name=HEALTH_SERVICE,
                    input=HealthCheckRequest,
                    output=HealthCheckResponse,
                    idempotency_level=IdempotencyLevel.UNKNOWN,
                    stream_type=stream_type,
                )

            return {
                f"/{HEALTH_SERVICE}/Check": Endpoint.unary(
                    method=info("Check", StreamType.UNARY), function=svc.check
                ),
                f"/{HEALTH_SERVICE}/Watch": Endpoint.server_stream(
                    method=info("Watch", StreamType.SERVER_STREAM), function=svc.watch
                ),
            }

        super().__init__(
            service=service, endpoints=endpoints, interceptors=interceptors, codecs=google_protobuf_codecs()
        )

    @property
    def path(self) -> str:
        """The URL prefix of the service."""
        return f"/{HEALTH_SERVICE}"
