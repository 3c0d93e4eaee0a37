"""OtterScale test tools (unpublished): pinned tool builds and real components for tests.

The pytest plugin (:mod:`otterscale.testing.plugin`) is registered through the ``pytest11`` entry
point, so every package's tests and ``tests/e2e`` get its fixtures without a conftest.
"""

from ._controlplane import ControlPlane, KubeAPIError, object_path, start_control_plane
from ._process import ManagedProcess, free_port
from .tools import ToolMissingError, tool_path

__all__ = [
    "ControlPlane",
    "KubeAPIError",
    "ManagedProcess",
    "ToolMissingError",
    "free_port",
    "object_path",
    "start_control_plane",
    "tool_path",
]
