"""Fan-out: ``otterscale.resource.v1.MultiClusterService`` (MultiList, MultiWatch), served by the hub.

One call lists or watches one resource type in many clusters; each cluster's part (a *leg*) is an
ordinary List or Watch sent to that cluster's agent as the caller, so every cluster's RBAC
decides, and agents need no change. Modules, by concept:

- :mod:`.service`   the two handlers (decode, authenticate, translate errors);
- :mod:`.listing`   MultiList pages (orders, budgets, retries, cursor content);
- :mod:`.watching`  MultiWatch streams (legs, recovery, resync, fair draining, checkpoints);
- :mod:`.legs`      the door to the hub: one leg to one agent, and typed per-cluster outcomes;
- :mod:`.selection` which clusters a call covers (configuration, labels, allow-lists);
- :mod:`.tokens`    sealed cursors and resume tokens;
- :mod:`.wire`      splicing agents' answers without decoding objects;
- :mod:`.budget`    legs per subject, per cluster and per hub;
- :mod:`.query`, :mod:`.errors`, :mod:`.audit`.

:class:`Fanout` builds all of it from the configuration and the hub's parts. The design notes
are ``shared/design/fanout.md``; where this differs, the module docstrings say why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from otterscale.common import OtterscaleConfig

from .._access import AccessPolicy
from .._auth import Authenticator
from .._limits import HubLimits, WatchSlots
from .._metrics import HubMetrics
from .._tunnels import Tunnels
from .._upstream import AgentClients
from .budget import ClusterLanes, SubjectLegs
from .legs import AgentLegs
from .listing import ListSettings, MultiLister
from .metrics import FanoutMetrics
from .selection import ClusterDirectory
from .service import MultiClusterServiceImpl
from .tokens import TokenSealer, derive_token_key
from .watching import MultiWatcher, WatchSettings

logger = logging.getLogger(__name__)

__all__ = ["Fanout", "token_keys"]


def token_keys(config: OtterscaleConfig) -> tuple[bytes, list[bytes]]:
    """The current and previous token keys (``fanout.token_key`` or the tunnel key material).

    Every replica derives the same keys from the configuration it shares, so a cursor issued by
    one leader is accepted by the next.
    """
    fanout = config.fanout
    if fanout.token_key is not None:
        secret = fanout.token_key.get_secret_value().encode()
    else:
        server = config.tunnel.server
        if server.key_seed is not None:
            secret = b"tunnel key seed\0" + server.key_seed.get_secret_value().encode()
        elif server.key_file is not None:
            secret = b"tunnel key file\0" + server.key_file.read_bytes()
        else:  # the configuration check demands a key for the server
            raise ValueError("no tunnel key to derive the fan-out token key from")
    previous = [derive_token_key(key.get_secret_value().encode()) for key in fanout.previous_token_keys]
    return derive_token_key(secret), previous


class Fanout:
    """MultiClusterService and the state it shares across calls (budgets, keys)."""

    def __init__(
        self,
        config: OtterscaleConfig,
        *,
        authenticator: Authenticator,
        tunnels: Tunnels,
        agents: AgentClients,
        keys: Mapping[str, bytes],
        metrics: HubMetrics,
        limits: HubLimits,
        watch_slots: WatchSlots,
        on_unreachable: Callable[[str], None] | None = None,
        access: AccessPolicy | None = None,
    ) -> None:
        fanout = config.fanout
        labels = {name: cluster.labels for name, cluster in config.clusters.items()}
        #: The hub's access policy (the same for single-cluster calls), or one of our own.
        self.access = access if access is not None else AccessPolicy(config.access, labels)
        directory = ClusterDirectory(labels, self.access, max_clusters=fanout.max_clusters_per_call)
        current, previous = token_keys(config)
        sealer = TokenSealer(current, previous)

        def refused(reason: str) -> None:
            metrics.limit_refusals.labels(reason=reason).inc()

        subject_legs = SubjectLegs(fanout.max_legs_per_subject, fanout.max_watch_legs, on_refused=refused)
        legs = AgentLegs(
            tunnels=tunnels, agents=agents, keys=keys, metrics=metrics, on_unreachable=on_unreachable
        )

        fanout_metrics = FanoutMetrics(metrics.registry)
        self.lanes = ClusterLanes(
            fanout.max_inflight_per_cluster, fanout_metrics, total=fanout.max_inflight_legs
        )
        concurrency = min(32, fanout.max_concurrency)
        self.lister = MultiLister(
            legs=legs,
            directory=directory,
            sealer=sealer,
            lanes=self.lanes,
            subject_legs=subject_legs,
            settings=ListSettings(
                per_cluster_timeout=fanout.per_cluster_timeout_seconds,
                default_concurrency=concurrency,
                max_concurrency=fanout.max_concurrency,
                default_page_items=fanout.default_page_items,
                max_page_items=fanout.max_page_items,
                cursor_ttl=fanout.cursor_ttl_seconds,
                page_bytes=limits.max_response_bytes,
            ),
            metrics=fanout_metrics,
        )

        self.watcher = MultiWatcher(
            legs=legs,
            directory=directory,
            sealer=sealer,
            subject_legs=subject_legs,
            watch_slots=watch_slots,
            settings=WatchSettings(
                per_cluster_timeout=fanout.per_cluster_timeout_seconds,
                default_concurrency=concurrency,
                max_concurrency=fanout.max_concurrency,
            ),
            on_refused=refused,
            metrics=fanout_metrics,
        )
        self.service = MultiClusterServiceImpl(
            authenticator=authenticator, lister=self.lister, watcher=self.watcher
        )

    def drain(self) -> None:
        """The hub shuts down: end open MultiWatch streams (last checkpoint, then unavailable)."""
        self.watcher.drain()

    def end_streams(self) -> None:
        """This replica stopped leading: end open MultiWatch streams (last checkpoint, unavailable)."""
        self.watcher.end_streams()
