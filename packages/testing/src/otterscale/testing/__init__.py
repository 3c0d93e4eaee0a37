"""OtterScale test tools (unpublished): pinned tool builds and real components for tests.

The pytest plugin (:mod:`otterscale.testing.plugin`) is registered through the ``pytest11`` entry
point, so every package's tests and ``tests/e2e`` get its fixtures without a conftest.
"""

from ._controlplane import ControlPlane, KubeAPIError, object_path, start_control_plane
from ._echo import ECHO_SERVICE, EchoAgent, EchoEvent, EchoService
from ._ha import (
    AgentCluster,
    HubReplicas,
    LeaderRelay,
    caller_rbac,
    create_namespace,
    replica_ip,
    service_account_kubeconfig,
    start_hub_replicas,
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
from ._process import ManagedProcess, free_port, holds_socket
from ._relay import BlackHoleRelay
from ._system import ClusterEntry, System, Timings, start_system
from .tools import ToolMissingError, keycloak_home, tool_path

__all__ = [
    "DEFAULT_USERS",
    "ECHO_SERVICE",
    "AgentCluster",
    "BlackHoleRelay",
    "ClusterEntry",
    "ControlPlane",
    "EchoAgent",
    "EchoEvent",
    "EchoService",
    "HubReplicas",
    "Keycloak",
    "KeycloakError",
    "KeycloakUser",
    "KubeAPIError",
    "LeaderRelay",
    "LocalIssuer",
    "ManagedProcess",
    "Node",
    "NodeError",
    "NodeUnavailableError",
    "System",
    "Timings",
    "TokenRequestError",
    "ToolMissingError",
    "caller_rbac",
    "create_namespace",
    "free_port",
    "holds_socket",
    "keycloak_home",
    "object_path",
    "replica_ip",
    "service_account_kubeconfig",
    "start_control_plane",
    "start_hub_replicas",
    "start_keycloak",
    "start_node",
    "start_system",
    "tool_path",
]
