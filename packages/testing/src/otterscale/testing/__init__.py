"""OtterScale test tools (unpublished): pinned tool builds and real components for tests.

The pytest plugin (:mod:`otterscale.testing.plugin`) is registered through the ``pytest11`` entry
point, so every package's tests and ``tests/e2e`` get its fixtures without a conftest.
"""

from ._controlplane import ControlPlane, KubeAPIError, object_path, start_control_plane
from ._doubles import AgentDouble, Call
from ._echo import ECHO_HUB_SERVICE, ECHO_ROUTE, ECHO_SERVICE, EchoAgent, EchoEvent, EchoService
from ._ha import (
    AgentCluster,
    HubReplicas,
    LeaderRelay,
    StagedLease,
    caller_rbac,
    chart_rbac,
    create_namespace,
    election_args,
    election_namespace,
    follower_rbac,
    replica_env,
    replica_ip,
    service_account_kubeconfig,
    set_pod,
    staged_lease,
    start_hub_replicas,
    write_lease,
)
from ._issuer import LocalIssuer
from ._keycloak import (
    DEFAULT_USERS,
    Keycloak,
    KeycloakError,
    KeycloakUser,
    TokenRequestError,
    start_keycloak,
)
from ._node import Node, NodeError, NodeUnavailableError, start_node
from ._process import ManagedProcess, child_pids, free_port, holds_socket, modules_loaded_by
from ._rawhttp import FrameFeeder, RawH1, RawH2, StreamState
from ._relay import BlackHoleRelay
from ._service import (
    AgentProcess,
    HubProcess,
    Metrics,
    ServiceProcess,
    eventually,
    http_get,
    http_ok,
    otterscale_command,
    service_env,
)
from ._streams import Outbox
from ._system import ClusterEntry, System, Timings, start_system
from .tools import ToolMissingError, keycloak_home, tool_path

__all__ = [
    "DEFAULT_USERS",
    "ECHO_HUB_SERVICE",
    "ECHO_ROUTE",
    "ECHO_SERVICE",
    "AgentCluster",
    "AgentDouble",
    "AgentProcess",
    "BlackHoleRelay",
    "Call",
    "ClusterEntry",
    "ControlPlane",
    "EchoAgent",
    "EchoEvent",
    "EchoService",
    "FrameFeeder",
    "HubProcess",
    "HubReplicas",
    "Keycloak",
    "KeycloakError",
    "KeycloakUser",
    "KubeAPIError",
    "LeaderRelay",
    "LocalIssuer",
    "ManagedProcess",
    "Metrics",
    "Node",
    "NodeError",
    "NodeUnavailableError",
    "Outbox",
    "RawH1",
    "RawH2",
    "ServiceProcess",
    "StagedLease",
    "StreamState",
    "System",
    "Timings",
    "TokenRequestError",
    "ToolMissingError",
    "caller_rbac",
    "chart_rbac",
    "child_pids",
    "create_namespace",
    "election_args",
    "election_namespace",
    "eventually",
    "follower_rbac",
    "free_port",
    "holds_socket",
    "http_get",
    "http_ok",
    "keycloak_home",
    "modules_loaded_by",
    "object_path",
    "otterscale_command",
    "replica_env",
    "replica_ip",
    "service_account_kubeconfig",
    "service_env",
    "set_pod",
    "staged_lease",
    "start_control_plane",
    "start_hub_replicas",
    "start_keycloak",
    "start_node",
    "start_system",
    "tool_path",
    "write_lease",
]
