"""The agent's Prometheus metrics (``GET /metrics`` on the agent's port, no signature needed).

Each agent owns its registry (no process-global state), so several agents can live in one
process (tests). Label values come from fixed sets (session kinds, directions, refusal reasons,
end codes); nothing a caller sends becomes a label.

============================================== ============================================================
``otterscale_agent_runtime_sessions_active``   open exec and port-forward sessions, by ``kind``
``otterscale_agent_runtime_session_seconds``   session lifetimes, by ``kind`` and ``code`` (how it ended)
``otterscale_agent_runtime_bytes_total``       session bytes, by ``kind`` and ``direction`` (``in``: from
                                               the client to the pod, ``out``: from the pod)
``otterscale_agent_runtime_refusals_total``    sessions, writes and resizes refused or ended by a limit,
                                               by ``kind`` and ``reason`` (``subject_limit``,
                                               ``agent_limit``, ``write_too_large``, ``pending_input``,
                                               ``input_gap``, ``idle_timeout``, ``max_lifetime``,
                                               ``access_denied``)
``otterscale_agent_log_streams_active``        open PodLog streams
============================================== ============================================================
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE", "REFUSAL_REASONS", "SESSION_KINDS", "AgentMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
SESSION_KINDS = ("exec", "port-forward")
REFUSAL_REASONS = (
    "subject_limit",
    "agent_limit",
    "write_too_large",
    "pending_input",
    "input_gap",
    "idle_timeout",
    "max_lifetime",
    "access_denied",
)
_SESSION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 8 * 3600.0)


class AgentMetrics:
    """The agent's metric families in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_active = Gauge(
            "otterscale_agent_runtime_sessions_active",
            "Open exec and port-forward sessions.",
            ["kind"],
            registry=self.registry,
        )
        self.session_seconds = Histogram(
            "otterscale_agent_runtime_session_seconds",
            "Lifetime of ended exec and port-forward sessions.",
            ["kind", "code"],
            buckets=_SESSION_BUCKETS,
            registry=self.registry,
        )
        self.session_bytes = Counter(
            "otterscale_agent_runtime_bytes",
            "Bytes through exec and port-forward sessions (in: towards the pod, out: from it).",
            ["kind", "direction"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "otterscale_agent_runtime_refusals",
            "Sessions, writes and resizes refused or ended by a limit, by reason.",
            ["kind", "reason"],
            registry=self.registry,
        )
        self.log_streams_active = Gauge(
            "otterscale_agent_log_streams_active", "Open PodLog streams.", registry=self.registry
        )
        for kind in SESSION_KINDS:
            self.sessions_active.labels(kind=kind)
            for direction in ("in", "out"):
                self.session_bytes.labels(kind=kind, direction=direction)
            for reason in REFUSAL_REASONS:
                self.refusals.labels(kind=kind, reason=reason)

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return bytes(generate_latest(self.registry))
