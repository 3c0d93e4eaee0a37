"""``otterscale.cluster.v1.AgentService``: what the hub shows in ListClusters about this agent.

Answered with the agent's own credentials (reading ``/version`` needs no impersonation) and only
to calls the hub signed, like every other call. The Kubernetes version is cached for a minute so
the hub's periodic asks cost the API server nothing noticeable.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from typing import Any

from otterscale.cluster.v1 import cluster_pb2

from ._kube import KubeClient

logger = logging.getLogger(__name__)

#: How long a read of the API server's version is reused.
VERSION_TTL_SECONDS = 60.0


def agent_version() -> str:
    """The installed otterscale-agent version."""
    try:
        return importlib.metadata.version("otterscale-agent")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "unknown"


class AgentInfoService:
    """Implements GetAgentInfo; a failing ``/version`` read gives an empty Kubernetes version."""

    def __init__(self, *, cluster: str, client: KubeClient, clock: Any = time.monotonic) -> None:
        self._cluster = cluster
        self._client = client
        self._clock = clock
        self._version = agent_version()
        self._kubernetes_version = ""
        self._read_at: float | None = None

    async def _kube_version(self) -> str:
        now = self._clock()
        if self._read_at is None or now - self._read_at > VERSION_TTL_SECONDS:
            try:
                info = await self._client.request_json("GET", "/version")
                self._kubernetes_version = str(info.get("gitVersion", "")) if isinstance(info, dict) else ""
            except Exception as exc:
                logger.warning("cannot read the Kubernetes version: %s", exc)
                self._kubernetes_version = ""
            self._read_at = now
        return self._kubernetes_version

    async def get_agent_info(
        self, request: cluster_pb2.GetAgentInfoRequest, ctx: Any, /
    ) -> cluster_pb2.GetAgentInfoResponse:
        return cluster_pb2.GetAgentInfoResponse(
            agent_version=self._version,
            kubernetes_version=await self._kube_version(),
            cluster=self._cluster,
        )
