"""Kubernetes object helpers: REST paths from discovery data, and the List/Watch clean-up.

Paths are built only from discovered resources and validated names, each path segment
percent-encoded, so a request field can never address anything but the object it names.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote

from otterscale.common import echo

from ._discovery import APIResourceInfo, group_version_path
from ._errors import InvalidRequestError

logger = logging.getLogger(__name__)

__all__ = ["LAST_APPLIED", "clean_object", "collection_path", "object_path", "with_type_meta"]

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

# Generous: Kubernetes validates names per resource; this only keeps paths well-formed.
_SEGMENT = re.compile(r"[^/\x00-\x1f\x7f]{1,253}")


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.fullmatch(value) or value in {".", ".."}:
        raise InvalidRequestError(f"{what} {echo(value)} is not a valid Kubernetes name")
    return quote(value, safe="")


def collection_path(info: APIResourceInfo, namespace: str) -> str:
    """``.../namespaces/<ns>/<resource>``; all namespaces (or cluster-scoped) when ns is empty."""
    base = group_version_path(info.group, info.version)
    if info.namespaced and namespace:
        return f"{base}/namespaces/{_segment(namespace, 'namespace')}/{info.resource}"
    return f"{base}/{info.resource}"


def object_path(info: APIResourceInfo, namespace: str, name: str) -> str:
    """Path of one object; namespaced resources need a namespace, cluster-scoped ignore it."""
    if not name:
        raise InvalidRequestError("name is required")
    if info.namespaced and not namespace:
        raise InvalidRequestError(f'namespace is required for namespaced resource "{info.resource}"')
    return f"{collection_path(info, namespace)}/{_segment(name, 'name')}"


def clean_object(obj: dict[str, Any]) -> dict[str, Any]:
    """Drop ``metadata.managedFields`` and the last-applied annotation (in place; returns obj).

    An annotations map left empty is dropped too, as the API contract says.
    """
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict) and LAST_APPLIED in annotations:
            del annotations[LAST_APPLIED]
            if not annotations:
                del metadata["annotations"]
    return obj


def with_type_meta(obj: dict[str, Any], info: APIResourceInfo) -> dict[str, Any]:
    """Fill ``apiVersion``/``kind`` where kube-apiserver leaves them out (built-in list items).

    client-go's unstructured lists do the same, so items look as they did from the Go agent.
    """
    if "kind" not in obj and info.kind:
        obj["kind"] = info.kind
    if "apiVersion" not in obj:
        obj["apiVersion"] = info.api_version
    return obj
