"""The package's public surface is exactly what __all__ says."""

from __future__ import annotations

import otterscale.agent as agent


def test_exported_names() -> None:
    assert sorted(agent.__all__) == sorted(
        [
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
    )
    for name in agent.__all__:
        assert getattr(agent, name) is not None


def test_documented_default_field_manager() -> None:
    assert agent.DEFAULT_FIELD_MANAGER == "otterscale"
