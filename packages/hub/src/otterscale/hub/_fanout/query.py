"""The Kubernetes part of a fan-out call (``ResourceQuery``) and its options, checked once per call.

Checked here, before any leg is planned, so that a request every cluster would refuse the same
way fails once with invalid_argument naming the field, instead of as many identical
per-cluster INVALID outcomes. The clusters still check everything themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.multicluster_pb2 import FanoutOptions, ResourceQuery

from .errors import InvalidFanoutRequestError

logger = logging.getLogger(__name__)

#: Longest group, version, resource or namespace (Kubernetes names are at most 253 characters).
MAX_NAME_CHARS = 253
#: Longest label or field selector (the agent's own limit).
MAX_SELECTOR_CHARS = 64 * 1024
#: Longest per-cluster timeout a caller may ask for.
MAX_PER_CLUSTER_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class Query:
    """A checked ResourceQuery."""

    group: str
    version: str
    resource: str
    namespace: str
    label_selector: str
    field_selector: str

    @classmethod
    def from_message(cls, query: ResourceQuery) -> Query:
        """Check ``query``; :class:`InvalidFanoutRequestError` names the first bad field."""
        for name in ("version", "resource"):
            if not getattr(query, name):
                raise InvalidFanoutRequestError(f"query.{name} is required")
        for name in ("group", "version", "resource", "namespace"):
            if len(getattr(query, name)) > MAX_NAME_CHARS:
                raise InvalidFanoutRequestError(f"query.{name} is longer than {MAX_NAME_CHARS} characters")
        for name in ("label_selector", "field_selector"):
            if len(getattr(query, name)) > MAX_SELECTOR_CHARS:
                raise InvalidFanoutRequestError(
                    f"query.{name} is longer than {MAX_SELECTOR_CHARS} characters"
                )
        return cls(
            query.group,
            query.version,
            query.resource,
            query.namespace,
            query.label_selector,
            query.field_selector,
        )

    def key(self) -> list[str]:
        """The fields as a list (what tokens are bound to)."""
        return [
            self.group,
            self.version,
            self.resource,
            self.namespace,
            self.label_selector,
            self.field_selector,
        ]

    def describe(self) -> str:
        """A short description for logs and audit records (selectors cut, never object content)."""
        gvr = "/".join(part for part in (self.group, self.version, self.resource) if part)
        text = f"{gvr} in {self.namespace or 'all namespaces'}"
        for name, value in (("labels", self.label_selector), ("fields", self.field_selector)):
            if value:
                text += f" {name} {value[:100]!r}"
        return text

    def list_request(self, cluster: str, limit: int, token: str) -> pb.ListRequest:
        """One cluster's List leg."""
        request = pb.ListRequest(
            cluster=cluster,
            group=self.group,
            version=self.version,
            resource=self.resource,
            namespace=self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            limit=limit,
        )
        if token:
            setattr(request, "continue", token)  # `continue` is a Python keyword
        return request

    def watch_request(self, cluster: str, resource_version: str, *, initial_events: bool) -> pb.WatchRequest:
        """One cluster's Watch leg."""
        return pb.WatchRequest(
            cluster=cluster,
            group=self.group,
            version=self.version,
            resource=self.resource,
            namespace=self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            resource_version=resource_version,
            send_initial_events=initial_events,
        )


def duration_seconds(value: Duration, field: str, *, maximum: float) -> float | None:
    """A Duration field in seconds (None when unset or zero); invalid_argument when out of range."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    seconds = float(value.seconds + value.nanos / 1e9)
    if seconds <= 0 or seconds > maximum or value.nanos < 0 or value.nanos >= 1_000_000_000:
        raise InvalidFanoutRequestError(f"{field} must be more than 0 and at most {maximum:g}s")
    return seconds


def checked_options(
    options: FanoutOptions, default_timeout: float, default_concurrency: int, max_concurrency: int
) -> tuple[float, int, bool]:
    """(per-cluster timeout, legs in flight, require_all) of ``options`` with the hub's defaults.

    ``max_concurrency`` above the hub's cap is lowered to it (the field documents the cap).
    """
    timeout = duration_seconds(
        options.per_cluster_timeout, "options.per_cluster_timeout", maximum=MAX_PER_CLUSTER_TIMEOUT
    )
    concurrency = options.max_concurrency or min(default_concurrency, max_concurrency)
    return (
        timeout if timeout is not None else default_timeout,
        min(concurrency, max_concurrency),
        options.require_all,
    )
