"""OtterScale test tools (unpublished): pinned tool builds and real components for tests.

The pytest plugin (:mod:`otterscale.testing.plugin`) is registered through the ``pytest11`` entry
point, so every package's tests and ``tests/e2e`` get its fixtures without a conftest.
"""

from ._controlplane import ControlPlane, KubeAPIError, object_path, start_control_plane
from ._keycloak import (
    DEFAULT_USERS,
    Keycloak,
    KeycloakError,
    KeycloakUser,
    TokenRequestError,
    start_keycloak,
)
from ._process import ManagedProcess, free_port
from ._system import ClusterEntry, System, Timings, start_system
from .tools import ToolMissingError, keycloak_home, tool_path

__all__ = [
    "DEFAULT_USERS",
    "ClusterEntry",
    "ControlPlane",
    "Keycloak",
    "KeycloakError",
    "KeycloakUser",
    "KubeAPIError",
    "ManagedProcess",
    "System",
    "Timings",
    "TokenRequestError",
    "ToolMissingError",
    "free_port",
    "keycloak_home",
    "object_path",
    "start_control_plane",
    "start_keycloak",
    "start_system",
    "tool_path",
]
