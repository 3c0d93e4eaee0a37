"""What every pod operation checks first, as the caller: the pod, the container, the permission.

- :func:`pod_path` builds ``/api/v1/namespaces/<ns>/pods/<name>[/<sub>]`` from validated names.
- :func:`choose_container` picks the container as kubectl does when none is named: the pod's
  ``kubectl.kubernetes.io/default-container`` annotation (when it names a container of the pod),
  else the only container; several and no annotation is invalid_argument listing them. (The
  original sent an empty name, which kube-apiserver refuses for multi-container pods.)
- :func:`require_access` asks Kubernetes, as the caller, whether the caller may ``get`` and
  ``create`` a subresource (``pods/exec``, ``pods/portforward``) with SelfSubjectAccessReviews,
  and refuses with permission_denied naming the verbs that are missing. Why both: the stream is a
  WebSocket upgrade, which is a GET, so kube-apiserver authorises it with ``get`` on the
  subresource; 1.35+ (``AuthorizePodWebsocketUpgradeCreatePermission``) adds a ``create`` check,
  older clusters do not, and read-only roles may grant ``get`` (``view`` does not, custom ones
  do). Asking for both gives every version the 1.35+ rule, and a role granting only ``create``
  (enough for kubectl's SPDY POST) gets a clear answer instead of the upgrade's bare 403.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from otterscale.common import Identity, echo

from .._discovery import APIResourceInfo
from .._errors import (
    InvalidRequestError,
    KubernetesUnavailableError,
    PermissionDeniedError,
    PreconditionError,
)
from .._kube import KubeClient
from .._objects import object_path

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONTAINER_ANNOTATION",
    "STREAM_VERBS",
    "Pod",
    "choose_container",
    "pod_path",
    "require_access",
]

DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
_PODS = APIResourceInfo(group="", version="v1", resource="pods", kind="Pod", namespaced=True)
_SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


def pod_path(namespace: str, name: str, subresource: str = "") -> str:
    """The pod's REST path (names validated and escaped; namespace and name are required)."""
    if not namespace:
        raise InvalidRequestError("namespace is required")
    path = object_path(_PODS, namespace, name)
    return f"{path}/{quote(subresource, safe='')}" if subresource else path


class Pod:
    """The parts of a Pod the runtime operations read."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        metadata = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        self.name = str(metadata.get("name") or "")
        self.annotations: Mapping[str, Any] = metadata.get("annotations") or {}
        self.init_containers = _names(spec.get("initContainers"))
        self.containers = _names(spec.get("containers"))
        self.ephemeral_containers = _names(spec.get("ephemeralContainers"))
        self.node_name = str(spec.get("nodeName") or "")
        self.phase = str(status.get("phase") or "")

    @property
    def all_containers(self) -> list[str]:
        """Init containers, then containers, then ephemeral ones (kubectl's --all-containers order)."""
        return [*self.init_containers, *self.containers, *self.ephemeral_containers]

    def has_container(self, name: str) -> bool:
        return name in self.all_containers


def _names(items: Any) -> list[str]:
    return [str(item.get("name")) for item in items or () if isinstance(item, dict) and item.get("name")]


async def get_pod(client: KubeClient, caller: Identity, namespace: str, name: str) -> Pod:
    """Read the pod as the caller (not_found, permission_denied... as Kubernetes says)."""
    obj = await client.request_json("GET", pod_path(namespace, name), caller=caller)
    if not isinstance(obj, dict):
        raise KubernetesUnavailableError("kubernetes API returned an invalid Pod")
    return Pod(obj)


def choose_container(pod: Pod, requested: str) -> str:
    """The container to use (see the module docstring); InvalidRequestError when unclear."""
    if requested:
        if not pod.has_container(requested):
            raise InvalidRequestError(
                f"container {echo(requested)} is not in pod {pod.name}; its containers: {_listing(pod)}"
            )
        return requested
    annotated = pod.annotations.get(DEFAULT_CONTAINER_ANNOTATION)
    if isinstance(annotated, str) and annotated in pod.containers:
        return annotated
    if len(pod.containers) == 1:
        return pod.containers[0]
    if not pod.containers:
        raise PreconditionError(f"pod {pod.name} has no containers")
    raise InvalidRequestError(
        f"pod {pod.name} has several containers; name one in container: {_listing(pod)}"
    )


def _listing(pod: Pod) -> str:
    return ", ".join(pod.all_containers) or "none"


def require_running(pod: Pod, what: str) -> None:
    """Refuse (failed_precondition) what cannot work in a pod that is not scheduled or has ended."""
    if pod.phase in ("Succeeded", "Failed"):
        raise PreconditionError(f"cannot {what} a completed pod; pod {pod.name} is {pod.phase}")
    if not pod.node_name:
        raise PreconditionError(f"cannot {what} pod {pod.name}: it is not scheduled to a node yet")


#: What kube-apiserver checks for a WebSocket exec or port-forward (see the module docstring).
STREAM_VERBS = ("get", "create")


async def require_access(
    client: KubeClient,
    caller: Identity,
    *,
    resource: str,
    subresource: str,
    namespace: str,
    name: str,
    verbs: Sequence[str] = STREAM_VERBS,
) -> None:
    """PermissionDeniedError unless Kubernetes says the caller may do every one of ``verbs`` to
    the subresource; the reviews run concurrently (one round trip of latency)."""

    async def review(verb: str) -> tuple[str, str] | None:
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb,
                    "group": "",
                    "resource": resource,
                    "subresource": subresource,
                    "name": name,
                }
            },
        }
        answer = await client.request_json(
            "POST", _SSAR_PATH, body=json.dumps(body).encode(), content_type="application/json", caller=caller
        )
        status = answer.get("status") if isinstance(answer, dict) else None
        if isinstance(status, dict) and status.get("allowed") is True:
            return None
        return verb, str((status or {}).get("reason") or "").strip()

    denied = [found for found in await asyncio.gather(*(review(verb) for verb in verbs)) if found]
    if denied:
        reasons = "; ".join(reason for _, reason in denied if reason)
        detail = f": {reasons}" if reasons else ""
        raise PermissionDeniedError(
            f"{caller.subject} may not {' or '.join(verb for verb, _ in denied)} {resource}/{subresource} "
            f'of pod "{name}" in namespace "{namespace}" (a WebSocket stream needs get and create){detail}'
        )


def command_params(command: Sequence[str]) -> list[tuple[str, str]]:
    """The exec command as repeated ``command`` query parameters."""
    return [("command", part) for part in command]
