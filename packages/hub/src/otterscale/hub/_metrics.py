"""The hub's Prometheus metrics (``GET /metrics``).

Each hub owns its own registry (no process-global state), so several hubs can live in one
process (tests) and ``/metrics`` shows exactly this hub. Label values are bounded: ``cluster`` is
always a configured cluster name (a request for an unknown cluster is counted without one), and
``method`` and ``code`` come from fixed sets.

=============================================== ==========================================================
``otterscale_hub_rpc_handled_total``            RPCs finished, by ``service``, ``method``, ``code``
``otterscale_hub_rpc_duration_seconds``         RPC duration histogram, same labels (a stream: its lifetime)
``otterscale_hub_watch_streams_active``         open streams to agents (Watch and every other), by ``cluster``
``otterscale_hub_tunnel_up``                    1 when the cluster's agent is connected, by ``cluster``
``otterscale_hub_tunnel_last_seen_timestamp_seconds`` last contact with the agent, by ``cluster``
``otterscale_hub_tunnel_transitions_total``     connected/disconnected changes, by ``cluster``
``otterscale_hub_agent_roundtrip_seconds``      hub-to-agent round trips through the tunnel, by
                                                ``cluster`` and ``method`` (``ping`` for health probes,
                                                else the forwarded unary RPC)
``otterscale_hub_chisel_up``                    1 while the tunnel server runs
``otterscale_hub_chisel_restarts_total``        restarts of the tunnel server after it died
``otterscale_hub_info``                         constant 1 with ``version`` and ``chisel_version``
``otterscale_hub_leader``                       1 while this replica leads (or runs alone), else 0
``otterscale_hub_leader_transitions_total``     times this replica gained or lost leadership
``otterscale_hub_forwarded_rpcs_total``         RPCs a follower forwarded to the leader, by ``service``,
                                                ``method`` and ``code`` (the code the caller got)
``otterscale_hub_limit_refusals_total``         calls refused or ended by a limit of ``_limits``, by
                                                ``reason`` (``request_too_large``, ``response_too_large``,
                                                ``watch_limit``, ``slow_watch_client``, ``request_timeout``,
                                                ``peer_requests``)
=============================================== ==========================================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger(__name__)

#: The ``reason`` labels of ``otterscale_hub_limit_refusals_total`` (see ``_limits``).
LIMIT_REASONS = (
    "request_too_large",
    "response_too_large",
    "watch_limit",
    "slow_watch_client",
    "request_timeout",
    "peer_requests",
)

_RPC_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    120.0,
)
_AGENT_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class HubMetrics:
    """Every metric of one hub, registered in :attr:`registry`."""

    def __init__(self, clusters: Iterable[str], *, version: str = "", chisel_version: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.rpc_handled = Counter(
            "otterscale_hub_rpc_handled",
            "RPCs finished by the hub, by service, method and Connect code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.rpc_duration = Histogram(
            "otterscale_hub_rpc_duration_seconds",
            "Duration of RPCs through the hub (for Watch and other streams: the lifetime of the stream).",
            ["service", "method", "code"],
            buckets=_RPC_BUCKETS,
            registry=registry,
        )
        self.watch_active = Gauge(
            "otterscale_hub_watch_streams_active",
            "Streams (Watch and every other streaming RPC) currently open through the hub to agents.",
            ["cluster"],
            registry=registry,
        )
        self.tunnel_up = Gauge(
            "otterscale_hub_tunnel_up",
            "1 when the cluster's agent is connected through its tunnel and answers, else 0.",
            ["cluster"],
            registry=registry,
        )
        self.tunnel_last_seen = Gauge(
            "otterscale_hub_tunnel_last_seen_timestamp_seconds",
            "Unix time of the last successful contact with the cluster's agent.",
            ["cluster"],
            registry=registry,
        )
        self.tunnel_transitions = Counter(
            "otterscale_hub_tunnel_transitions",
            "Changes of the cluster's connected state (connects and disconnects).",
            ["cluster"],
            registry=registry,
        )
        self.agent_roundtrip = Histogram(
            "otterscale_hub_agent_roundtrip_seconds",
            "Hub-to-agent round trips through the tunnel: method=ping for health probes, "
            "else the forwarded unary RPC.",
            ["cluster", "method"],
            buckets=_AGENT_BUCKETS,
            registry=registry,
        )
        self.chisel_up = Gauge(
            "otterscale_hub_chisel_up", "1 while the tunnel server (chisel) runs, else 0.", registry=registry
        )
        self.chisel_restarts = Counter(
            "otterscale_hub_chisel_restarts",
            "Restarts of the tunnel server (chisel) after it exited unexpectedly.",
            registry=registry,
        )
        self.leader = Gauge(
            "otterscale_hub_leader",
            "1 while this replica is the leader (or runs without leader election), else 0.",
            registry=registry,
        )
        self.leader_transitions = Counter(
            "otterscale_hub_leader_transitions",
            "Times this replica gained or lost leadership.",
            registry=registry,
        )
        self.forwarded_rpcs = Counter(
            "otterscale_hub_forwarded_rpcs",
            "RPCs this replica forwarded to the leader, by service, method and the caller's code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.limit_refusals = Counter(
            "otterscale_hub_limit_refusals",
            "Calls refused or ended with resource_exhausted by one of the hub's limits, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in LIMIT_REASONS:
            self.limit_refusals.labels(reason=reason)
        self.info = Gauge(
            "otterscale_hub_info",
            "Constant 1, labelled with the hub and chisel versions.",
            ["version", "chisel_version"],
            registry=registry,
        )
        self.info.labels(version=version, chisel_version=chisel_version).set(1)
        for cluster in clusters:
            self.tunnel_up.labels(cluster=cluster).set(0)
            self.watch_active.labels(cluster=cluster).set(0)
            self.tunnel_transitions.labels(cluster=cluster)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
