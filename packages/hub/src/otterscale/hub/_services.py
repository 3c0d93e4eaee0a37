"""The services the hub serves: the one place where a service is registered.

Two kinds, each a list entry:

- **cluster-routed** (:data:`ROUTED_SERVICES`): served by the agents; the hub forwards every
  method of the service to the agent of the cluster each call names (:mod:`._proxy`), from the
  service's descriptor alone. The .proto says where a request names its cluster (field 1
  ``cluster`` by default, else the ``(otterscale.routing.v1.route)`` method option, see
  :mod:`._routes`). Adding a service to the agents means adding its descriptor here: no handler,
  no client, no code per RPC.
- **hub-served** (:data:`HUB_SERVICES`): answered by the hub itself from its own state
  (ClusterService; the coming MultiClusterService). A :class:`HubService` pairs the descriptor
  with a factory of the ASGI application that serves it on the leader (or a hub alone); followers
  forward its calls to the leader, from the descriptor too (:mod:`._forward`). They are never
  forwarded to an agent.

Both kinds get the same front: authentication in the handlers, the client limits, the access log
and metrics, the audit trail, reflection and health.

The audit trail (:mod:`._audit`) covers every method of every service registered here, from its
descriptor: a method is audited always, unless it is a read (:data:`READ_METHODS`, or
``option idempotency_level = NO_SIDE_EFFECTS`` in its .proto), which is audited only at
``audit.reads: metadata``. So a new service or RPC is audited as a write until it is declared
a read here: no audit code per RPC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from connectrpc.interceptor import Interceptor
from google.protobuf.descriptor import ServiceDescriptor  # type: ignore[import-untyped]  # no stubs

from otterscale.cluster.v1 import cluster_pb2
from otterscale.cluster.v1.cluster_connect import ClusterServiceASGIApplication
from otterscale.common import ASGIApp
from otterscale.resource.v1 import resource_pb2
from otterscale.runtime.v1 import runtime_pb2

from ._auth import Authenticator
from ._clusters import ClusterServiceImpl
from ._metrics import HubMetrics
from ._tunnels import Tunnels

if TYPE_CHECKING:  # both import the limits, which read this registry
    from ._limits import HubLimits
    from ._upstream import AgentClients

logger = logging.getLogger(__name__)

#: Services served by the agents and forwarded by cluster (one entry per service).
ROUTED_SERVICES: tuple[ServiceDescriptor, ...] = (
    resource_pb2.DESCRIPTOR.services_by_name["ResourceService"],
    runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"],
)

#: Methods of the registered services that only read but whose .proto cannot say so
#: (``idempotency_level = NO_SIDE_EFFECTS`` would also turn on Connect GET, which the API does not
#: offer for them): audited only at ``audit.reads: metadata``. Every method not listed here and not
#: marked NO_SIDE_EFFECTS is audited always (see the module docstring).
#: The runtime's session traffic (WriteTTY, ResizeTTY, WritePortForward) is listed too, though
#: it writes: one event per keystroke would bury the trail, and the session is audited already,
#: by the hub at the end of its ExecuteTTY or PortForward call and by the agent at its start and end.
READ_METHODS: frozenset[str] = frozenset(
    [
        *(
            f"/otterscale.resource.v1.ResourceService/{method}"
            for method in ("Discovery", "Schema", "List", "Get", "Describe", "Watch")
        ),
        *(
            f"/otterscale.runtime.v1.RuntimeService/{method}"
            for method in ("PodLog", "GetScale", "WriteTTY", "ResizeTTY", "WritePortForward")
        ),
    ]
)


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """What the application of a hub-served service may use (built once at start-up)."""

    authenticator: Authenticator
    tunnels: Tunnels
    agents: AgentClients
    keys: Mapping[str, bytes]
    metrics: HubMetrics
    limits: HubLimits
    #: The hub's interceptors (request id, access log, metrics, audit trail): pass them to the
    #: application.
    interceptors: tuple[Interceptor, ...]


@dataclass(frozen=True, slots=True)
class HubService:
    """A service the hub answers itself: its descriptor and the factory of its ASGI application."""

    descriptor: ServiceDescriptor
    application: Callable[[ServiceContext], ASGIApp]


def _cluster_service(context: ServiceContext) -> ASGIApp:
    service = ClusterServiceImpl(authenticator=context.authenticator, tunnels=context.tunnels)
    app: ASGIApp = ClusterServiceASGIApplication(service, interceptors=context.interceptors)
    return app


#: Services the hub answers itself (one entry per service).
HUB_SERVICES: tuple[HubService, ...] = (
    HubService(cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"], _cluster_service),
)
