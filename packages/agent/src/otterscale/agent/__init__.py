"""otterscale-agent: executes ResourceService calls in one Kubernetes cluster as the calling user.

Run it with ``otterscale agent --cluster NAME`` (see ``--help``): a small launcher that starts
Envoy with the agent inside (:class:`Agent`, served by pyvoy as ``otterscale.agent._hosted:app``).

Only the names in ``__all__`` are public; the underscore modules may change at any time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from otterscale.common import lazy_exports

if TYPE_CHECKING:
    from ._agent import Agent, AgentSettings
    from ._cli import build_parser, main
    from ._defaults import DISCOVERY_TTL
    from ._errors import AgentError
    from ._kubeconfig import KubeConfigError, KubeConnection, load_connection
    from ._service import DEFAULT_FIELD_MANAGER
    from ._tunnel import TunnelSettings

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Agent": "._agent",
        "AgentSettings": "._agent",
        "build_parser": "._cli",
        "main": "._cli",
        "DISCOVERY_TTL": "._defaults",
        "AgentError": "._errors",
        "KubeConfigError": "._kubeconfig",
        "KubeConnection": "._kubeconfig",
        "load_connection": "._kubeconfig",
        "DEFAULT_FIELD_MANAGER": "._service",
        "TunnelSettings": "._tunnel",
    },
)

__all__ = [
    "DEFAULT_FIELD_MANAGER",
    "DISCOVERY_TTL",
    "Agent",
    "AgentError",
    "AgentSettings",
    "KubeConfigError",
    "KubeConnection",
    "TunnelSettings",
    "build_parser",
    "load_connection",
    "main",
]
