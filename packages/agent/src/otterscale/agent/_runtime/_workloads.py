"""Scale, GetScale and Restart: workload changes through the API as the caller.

Scale reads the ``/scale`` subresource, checks the optional ``current_replicas`` precondition,
and writes it back with the resourceVersion it read (optimistic concurrency). A conflict (a
controller such as an HPA wrote in between) is retried from a fresh read, at most
:data:`CONFLICT_RETRIES` times, re-checking the precondition each time; after that it is
failed_precondition with Kubernetes' message. The answer says what changed: the desired count
before and after, the count the controller reports and the pods' selector. RBAC: ``get`` and
``update`` on ``<resource>/scale``. A resource without ``/scale`` is Kubernetes' not_found.

Restart is ``kubectl rollout restart``: it sets the pod template annotation
``kubectl.kubernetes.io/restartedAt`` to the current time (RFC 3339, UTC, seconds), with a merge
patch that carries the resourceVersion it read (so a change in between is retried, not
overwritten). Only apps/v1 Deployments, DaemonSets and StatefulSets roll out when their template
changes; anything else (a ReplicaSet, a CronJob, a Pod, a custom resource) would be a silent
no-op, so it is refused. A paused Deployment is refused as kubectl does (nothing would roll out
until it is resumed). If the annotation already holds this second's time (a restart a moment
ago), the restart waits for the next second, so it always changes the template and always
rolls. RBAC: ``get`` and ``patch`` on the workload.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from otterscale.common import Identity, echo

from .._discovery import DiscoveryCache
from .._errors import InvalidRequestError, KubernetesAPIError, KubernetesUnavailableError, PreconditionError
from .._kube import KubeClient
from .._objects import object_path

logger = logging.getLogger(__name__)

__all__ = ["RESTARTED_AT", "ScaleState", "Workloads"]

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
#: How many times a conflicting write is retried from a fresh read.
CONFLICT_RETRIES = 3
#: What Restart accepts: (group, version, resource).
RESTARTABLE = frozenset(
    {("apps", "v1", "deployments"), ("apps", "v1", "daemonsets"), ("apps", "v1", "statefulsets")}
)


class ScaleState:
    """The parts of an ``autoscaling/v1`` Scale the API reports."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        self.replicas = _int(spec.get("replicas"))
        self.status_replicas = _int(status.get("replicas"))
        self.selector = str(status.get("selector") or "")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def _backoff(attempt: int) -> None:
    """A short, jittered pause before a retry, so writers that collided do not collide again."""
    await asyncio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # noqa: S311 - jitter, not a secret


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Workloads:
    """Scale, GetScale and Restart against one cluster."""

    def __init__(self, client: KubeClient, discovery: DiscoveryCache) -> None:
        self._client = client
        self._discovery = discovery

    async def _scale_path(self, group: str, version: str, resource: str, namespace: str, name: str) -> str:
        if not version:
            raise InvalidRequestError("version is required")
        if not resource:
            raise InvalidRequestError("resource is required")
        info = await self._discovery.lookup(group, version, resource)
        return object_path(info, namespace, name) + "/scale"

    async def _read_scale(self, path: str, caller: Identity) -> dict[str, Any]:
        obj = await self._client.request_json("GET", path, caller=caller)
        if not isinstance(obj, dict):
            raise KubernetesUnavailableError("kubernetes API returned an invalid Scale")
        return obj

    async def get_scale(
        self, caller: Identity, *, group: str, version: str, resource: str, namespace: str, name: str
    ) -> ScaleState:
        """The workload's scale, read as the caller."""
        path = await self._scale_path(group, version, resource, namespace, name)
        return ScaleState(await self._read_scale(path, caller))

    async def scale(
        self,
        caller: Identity,
        *,
        group: str,
        version: str,
        resource: str,
        namespace: str,
        name: str,
        replicas: int,
        current_replicas: int | None,
    ) -> tuple[ScaleState, ScaleState]:
        """Set the desired replicas; returns the scale before and after."""
        if replicas < 0:
            raise InvalidRequestError(f"replicas must not be negative, got {replicas}")
        if current_replicas is not None and current_replicas < 0:
            raise InvalidRequestError(f"current_replicas must not be negative, got {current_replicas}")
        path = await self._scale_path(group, version, resource, namespace, name)
        for attempt in range(CONFLICT_RETRIES + 1):
            obj = await self._read_scale(path, caller)
            before = ScaleState(obj)
            if current_replicas is not None and before.replicas != current_replicas:
                raise PreconditionError(
                    f"{resource} {echo(name)} has {before.replicas} desired replicas, not "
                    f"{current_replicas} (current_replicas); nothing was changed"
                )
            obj.setdefault("spec", {})["replicas"] = replicas
            try:
                updated = await self._client.request_json(
                    "PUT", path, body=json.dumps(obj).encode(), content_type="application/json", caller=caller
                )
            except KubernetesAPIError as exc:
                if exc.http_status == 409 and attempt < CONFLICT_RETRIES:
                    logger.debug("scale of %s conflicted (attempt %d); retrying", resource, attempt + 1)
                    await _backoff(attempt)
                    continue
                raise
            if not isinstance(updated, dict):
                raise KubernetesUnavailableError("kubernetes API returned an invalid Scale")
            return before, ScaleState(updated)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def restart(
        self, caller: Identity, *, group: str, version: str, resource: str, namespace: str, name: str
    ) -> str:
        """Roll the workload's pods (see the module docstring); returns the annotation value set."""
        if (group, version, resource) not in RESTARTABLE:
            shown = f"{group}/{version}" if group else version
            raise InvalidRequestError(
                f"cannot restart {echo(resource)} ({echo(shown)}): only apps/v1 deployments, daemonsets "
                "and statefulsets roll out their pods when restarted"
            )
        info = await self._discovery.lookup(group, version, resource)
        path = object_path(info, namespace, name)
        for attempt in range(CONFLICT_RETRIES + 1):
            obj = await self._client.request_json("GET", path, caller=caller)
            if not isinstance(obj, dict):
                raise KubernetesUnavailableError("kubernetes API returned an invalid object")
            spec = obj.get("spec") or {}
            if resource == "deployments" and spec.get("paused") is True:
                raise PreconditionError(
                    f"deployment {echo(name)} is paused: a restart would not roll out until it is "
                    "resumed (kubectl rollout resume); resume it first"
                )
            template_meta = (spec.get("template") or {}).get("metadata") or {}
            previous = (template_meta.get("annotations") or {}).get(RESTARTED_AT)
            value = _now()
            while value == previous:
                # A restart within the same second would write the same value: no rollout at all.
                await asyncio.sleep(1.0 - (time.time() % 1.0) + 0.001)
                value = _now()
            patch: dict[str, Any] = {
                "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: value}}}}
            }
            resource_version = (obj.get("metadata") or {}).get("resourceVersion")
            if resource_version:
                # A precondition: a change since the read (say, a pause) is a conflict, retried.
                patch["metadata"] = {"resourceVersion": str(resource_version)}
            try:
                await self._client.request(
                    "PATCH",
                    path,
                    body=json.dumps(patch).encode(),
                    content_type="application/merge-patch+json",
                    caller=caller,
                )
            except KubernetesAPIError as exc:
                if exc.http_status == 409 and attempt < CONFLICT_RETRIES:
                    await _backoff(attempt)
                    continue
                raise
            return value
        raise AssertionError("unreachable: the last attempt returns or raises")
