"""The fan-out's Prometheus metrics, registered in the hub's own registry (``GET /metrics``).

Label values are bounded: ``cluster`` is always a configured cluster, ``outcome`` a
ClusterStatus.Outcome name, ``rpc`` MultiList or MultiWatch.

=================================================== =====================================================
``otterscale_hub_fanout_leg_outcomes_total``        leg outcomes (MultiList: one per leg and page;
                                                    MultiWatch: one per leg state change), by ``rpc``
                                                    and ``outcome``
``otterscale_hub_fanout_list_legs_inflight``        MultiList legs in flight to a cluster, by ``cluster``
``otterscale_hub_fanout_list_legs_inflight_peak``   the most seen at once since the hub started (never
                                                    above ``fanout.max_inflight_per_cluster``)
``otterscale_hub_fanout_list_leg_waits_total``      MultiList legs that waited for a cluster's slot
``otterscale_hub_fanout_watch_streams``             open MultiWatch streams
``otterscale_hub_fanout_watch_legs``                open MultiWatch legs
=================================================== =====================================================
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge

logger = logging.getLogger(__name__)


class FanoutMetrics:
    """The fan-out's metrics (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry(auto_describe=True)
        self.outcomes = Counter(
            "otterscale_hub_fanout_leg_outcomes",
            "Fan-out leg outcomes by RPC and ClusterStatus outcome.",
            ["rpc", "outcome"],
            registry=registry,
        )
        self.inflight = Gauge(
            "otterscale_hub_fanout_list_legs_inflight",
            "MultiList legs in flight to the cluster (all callers).",
            ["cluster"],
            registry=registry,
        )
        self.inflight_peak = Gauge(
            "otterscale_hub_fanout_list_legs_inflight_peak",
            "Most MultiList legs in flight to the cluster at once since the hub started.",
            ["cluster"],
            registry=registry,
        )
        self.waits = Counter(
            "otterscale_hub_fanout_list_leg_waits",
            "MultiList legs that waited for one of the cluster's in-flight slots.",
            ["cluster"],
            registry=registry,
        )
        self.watch_streams = Gauge(
            "otterscale_hub_fanout_watch_streams", "Open MultiWatch streams.", registry=registry
        )
        self.watch_legs = Gauge(
            "otterscale_hub_fanout_watch_legs", "Open MultiWatch legs.", registry=registry
        )
