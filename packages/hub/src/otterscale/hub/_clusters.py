"""ClusterService: every configured cluster and the state of its agent, for UIs and operators.

Any authenticated user may list the clusters it may use (``access`` in otterscale.yaml; without
it, every cluster): the answer holds names, connection state, versions, ports and the last problem
seen, never anything from inside a cluster.
"""

from __future__ import annotations

import logging
from typing import Any

from connectrpc.request import RequestContext
from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]  # no stubs for protobuf 7
from google.protobuf.timestamp_pb2 import Timestamp  # type: ignore[import-untyped]  # no stubs for protobuf 7

from otterscale.cluster.v1.cluster_pb2 import Cluster, ListClustersRequest, ListClustersResponse
from otterscale.common import OtterscaleError

from ._access import AccessPolicy
from ._auth import Authenticator
from ._errors import to_connect_error
from ._tunnels import ClusterStatus, Tunnels

logger = logging.getLogger(__name__)


class ClusterServiceImpl:
    """``otterscale.cluster.v1.ClusterService`` over the hub's tunnel state."""

    def __init__(
        self, *, authenticator: Authenticator, tunnels: Tunnels, access: AccessPolicy | None = None
    ) -> None:
        self._auth = authenticator
        self._tunnels = tunnels
        self._access = access

    async def list_clusters(
        self, request: ListClustersRequest, ctx: RequestContext[Any, Any]
    ) -> ListClustersResponse:
        """Every configured cluster the caller may use, sorted by name (authenticated)."""
        try:
            identity = await self._auth.caller(ctx)
        except OtterscaleError as exc:
            raise to_connect_error(exc) from None
        statuses = self._tunnels.snapshot()
        if self._access is not None:
            allowed = self._access.allowed(identity)
            statuses = [status for status in statuses if status.name in allowed]
        return ListClustersResponse(clusters=[cluster_message(status) for status in statuses])


def cluster_message(status: ClusterStatus) -> Cluster:
    """The API message for one cluster's status."""
    message = Cluster(
        name=status.name,
        connected=status.connected,
        since=_timestamp(status.since),
        last_error=status.last_error or "",
        agent_version=status.agent_version,
        kubernetes_version=status.kubernetes_version,
        tunnel_port=status.tunnel_port,
        agent_address=status.agent_address if status.tunnel_up else "",
    )
    if status.last_error_at is not None:
        message.last_error_time.CopyFrom(_timestamp(status.last_error_at))
    if status.last_seen is not None:
        message.last_seen.CopyFrom(_timestamp(status.last_seen))
    if status.round_trip is not None:
        duration = Duration()
        duration.FromNanoseconds(int(status.round_trip * 1e9))
        message.round_trip.CopyFrom(duration)
    return message


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
