"""The cluster's API resources, discovered with the agent's own credentials and cached briefly.

Why cached: every List/Get/... must know whether its resource exists and is namespaced (to build
the URL and to answer not_found precisely), and a discovery round trip per call would double the
latency. Why only briefly: new CRDs must appear without a restart.

Freshness contract (documented in the README): the cache is refreshed when it is older than
``ttl`` (default :data:`DEFAULT_TTL`, 10 s) at the time of a call, and also, at most once per
:data:`MISS_REFRESH_INTERVAL`, when a call names a resource the cache does not know. So a new CRD
is usable by List/Get/... as soon as kube-apiserver serves it, and shows in Discovery within 10 s.

Aggregated discovery (``apidiscovery.k8s.io/v2``, two requests: ``/api`` and ``/apis``) is used
where the server has it; otherwise the legacy per-group-version documents are fetched in
parallel. Either way a group-version that fails (a broken aggregated APIService, reported as
``freshness: Stale`` or as a failing request) is left out and logged, never fatal.

Subresources are listed as the original Go service listed them (client-go's
``ServerGroupsAndResources``, whose conversion of aggregated discovery is
``discovery.convertAPIGroup``): after each resource, one entry per subresource named
``<resource>/<subresource>`` (``pods/log``, ``deployments/scale``) with the subresource's own kind
and verbs, the parent's scope and no short names; an aggregated entry whose ``responseKind`` is
missing or empty is left out (its subresources are not; kube-apiserver always sets it). A
dashboard reads them to know which actions a resource offers. Only whole resources are
addressable by List/Get/...: :meth:`lookup` never returns a subresource.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from otterscale.common import echo

from ._defaults import DISCOVERY_TTL as DEFAULT_TTL
from ._errors import AgentError, KubernetesUnavailableError, UnknownResourceError
from ._kube import KubeClient

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TTL", "APIResourceInfo", "DiscoveryCache", "group_version_path"]

MISS_REFRESH_INTERVAL = 1.0
_PARALLEL_FETCHES = 8

_AGGREGATED_ACCEPT = ", ".join(
    (
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList",
        "application/json",
    )
)


@dataclasses.dataclass(frozen=True, slots=True)
class APIResourceInfo:
    """One resource of one group-version, as the API contract's APIResource describes it."""

    group: str
    version: str
    resource: str
    kind: str
    namespaced: bool
    verbs: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def is_subresource(self) -> bool:
        """``pods/log``, ``deployments/scale``: listed by Discovery, not addressable by itself."""
        return "/" in self.resource


def group_version_path(group: str, version: str) -> str:
    """``/api/v1`` for the core group, ``/apis/<group>/<version>`` otherwise."""
    return f"/apis/{group}/{version}" if group else f"/api/{version}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Snapshot:
    resources: tuple[APIResourceInfo, ...]
    index: Mapping[tuple[str, str, str], APIResourceInfo]
    fetched_at: float


class DiscoveryCache:
    """Discovered resources with a TTL; concurrent callers share one refresh."""

    def __init__(
        self,
        client: KubeClient,
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._snapshot: _Snapshot | None = None
        self._lock = asyncio.Lock()
        self._last_miss_refresh = float("-inf")

    @property
    def ttl(self) -> float:
        return self._ttl

    async def resources(self) -> Sequence[APIResourceInfo]:
        """Every resource and subresource of every served group-version (fresh within the TTL)."""
        return (await self._fresh()).resources

    async def lookup(self, group: str, version: str, resource: str) -> APIResourceInfo:
        """The resource, refreshing once on a miss; UnknownResourceError if the cluster lacks it."""
        key = (group, version, resource)
        found = (await self._fresh()).index.get(key)
        if found is not None:
            return found
        now = self._clock()
        if now - self._last_miss_refresh >= MISS_REFRESH_INTERVAL:
            self._last_miss_refresh = now
            found = (await self._fresh(force=True)).index.get(key)
            if found is not None:
                return found
        gv = f"{group}/{version}" if group else version
        raise UnknownResourceError(f"the server does not serve resource {echo(resource)} in {echo(gv)}")

    async def _fresh(self, *, force: bool = False) -> _Snapshot:
        snapshot = self._snapshot
        if snapshot is not None and not force and self._clock() - snapshot.fetched_at < self._ttl:
            return snapshot
        async with self._lock:
            # Another caller may have refreshed while this one waited for the lock.
            current = self._snapshot
            if current is not None and current is not snapshot:
                return current
            started = self._clock()
            resources = await self._discover()
            index = {(r.group, r.version, r.resource): r for r in resources if not r.is_subresource}
            self._snapshot = _Snapshot(tuple(resources), index, started)
            logger.debug("discovered %d resources", len(resources))
            return self._snapshot

    async def _discover(self) -> list[APIResourceInfo]:
        core, core_aggregated = await self._aggregated_or_legacy("/api")
        groups, groups_aggregated = await self._aggregated_or_legacy("/apis")
        resources: list[APIResourceInfo] = []
        legacy_paths: list[tuple[str, str]] = []
        if core_aggregated:
            resources += _parse_aggregated(core)
        else:
            legacy_paths += [("", v) for v in core.get("versions") or ()]
        if groups_aggregated:
            resources += _parse_aggregated(groups)
        else:
            for group in groups.get("groups") or ():
                for version in group.get("versions") or ():
                    legacy_paths.append((str(group.get("name", "")), str(version.get("version", ""))))
        if legacy_paths:
            resources += await self._legacy(legacy_paths)
        return resources

    async def _aggregated_or_legacy(self, path: str) -> tuple[dict[str, Any], bool]:
        data, content_type = await self._client.request("GET", path, accept=_AGGREGATED_ACCEPT)
        try:
            decoded = json.loads(data)
        except ValueError as exc:
            raise KubernetesUnavailableError(
                f"kubernetes API sent invalid discovery JSON for {path}"
            ) from exc
        if not isinstance(decoded, dict):
            raise KubernetesUnavailableError(f"kubernetes API returned unexpected discovery data for {path}")
        aggregated = "as=APIGroupDiscoveryList" in content_type.replace(" ", "") or (
            decoded.get("kind") == "APIGroupDiscoveryList"
        )
        return decoded, aggregated

    async def _legacy(self, group_versions: Iterable[tuple[str, str]]) -> list[APIResourceInfo]:
        limit = asyncio.Semaphore(_PARALLEL_FETCHES)

        async def fetch(group: str, version: str) -> list[APIResourceInfo]:
            async with limit:
                try:
                    doc = await self._client.request_json("GET", group_version_path(group, version))
                except AgentError as exc:
                    logger.warning("discovery of %s/%s failed, leaving it out: %s", group, version, exc)
                    return []
            return _parse_legacy(group, version, doc)

        batches = await asyncio.gather(*(fetch(g, v) for g, v in group_versions))
        return [r for batch in batches for r in batch]


def _response_kind(entry: Mapping[str, Any]) -> str | None:
    """The entry's ``responseKind.kind``; None when the GVK is missing or empty (as client-go)."""
    gvk = entry.get("responseKind")
    if not isinstance(gvk, Mapping) or not any(gvk.get(key) for key in ("group", "version", "kind")):
        return None
    return str(gvk.get("kind") or "")


def _parse_aggregated(doc: Mapping[str, Any]) -> list[APIResourceInfo]:
    out: list[APIResourceInfo] = []
    for item in doc.get("items") or ():
        group = str((item.get("metadata") or {}).get("name") or "")
        for entry in item.get("versions") or ():
            version = str(entry.get("version") or "")
            if entry.get("freshness") == "Stale":
                logger.warning("discovery of %s/%s is stale (broken APIService?); left out", group, version)
                continue
            for res in entry.get("resources") or ():
                name = str(res.get("resource") or "")
                if not name:
                    continue
                namespaced = res.get("scope") == "Namespaced"
                kind = _response_kind(res)
                if kind is not None:
                    out.append(
                        APIResourceInfo(
                            group=group,
                            version=version,
                            resource=name,
                            kind=kind,
                            namespaced=namespaced,
                            verbs=tuple(res.get("verbs") or ()),
                            short_names=tuple(res.get("shortNames") or ()),
                        )
                    )
                for sub in res.get("subresources") or ():
                    sub_kind = _response_kind(sub)
                    if sub_kind is None:
                        continue
                    out.append(
                        APIResourceInfo(
                            group=group,
                            version=version,
                            resource=f"{name}/{sub.get('subresource') or ''}",
                            kind=sub_kind,
                            namespaced=namespaced,
                            verbs=tuple(sub.get("verbs") or ()),
                        )
                    )
    return out


def _parse_legacy(group: str, version: str, doc: Mapping[str, Any]) -> list[APIResourceInfo]:
    out: list[APIResourceInfo] = []
    for res in doc.get("resources") or ():
        name = str(res.get("name") or "")
        if not name:
            continue
        out.append(
            APIResourceInfo(
                group=group,
                version=version,
                resource=name,
                kind=str(res.get("kind") or ""),
                namespaced=bool(res.get("namespaced")),
                verbs=tuple(res.get("verbs") or ()),
                short_names=tuple(res.get("shortNames") or ()),
            )
        )
    return out
