"""Which clusters a fan-out call covers, resolved from configuration on every page and every resume.

Order (fanout.md 2.4): start from the configured clusters; keep those the caller may use
(:class:`~otterscale.hub._access.AccessPolicy`); apply the explicit names, then the label selector
over ``clusters.<name>.labels``; sort by name. An explicitly named cluster that is not configured,
or that the caller may not use, is *unknown*: both are the same set lookup, answered from
memory without dialling anything, so neither the answer nor its timing tells them apart. A label
selector never matches a cluster the caller may not use.

Never trusted from a cursor or resume token: a cluster the caller lost access to between two
pages is simply no longer selected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from otterscale.common import Identity, LabelSelector, LabelSyntaxError, echo
from otterscale.resource.v1.multicluster_pb2 import ClusterSelection

from .._access import AccessPolicy
from .errors import InvalidFanoutRequestError

logger = logging.getLogger(__name__)

#: Longest cluster name considered (configured names are DNS labels of at most 63 characters).
MAX_NAME_CHARS = 253


@dataclass(frozen=True, slots=True)
class Resolution:
    """The clusters of one call: ``clusters`` to ask (sorted), ``unknown`` names (sorted).

    ``denied`` are the unknown names that are configured clusters the access policy keeps from
    the caller: for the audit record only, never for the caller (forbidden looks like unknown).
    """

    clusters: tuple[str, ...]
    unknown: tuple[str, ...]
    denied: frozenset[str] = frozenset()

    @property
    def total(self) -> int:
        """Clusters in the selection, unknown ones included."""
        return len(self.clusters) + len(self.unknown)


class ClusterDirectory:
    """The configured clusters, their labels and the access policy (immutable)."""

    def __init__(
        self, labels: Mapping[str, Mapping[str, str]], access: AccessPolicy, *, max_clusters: int
    ) -> None:
        self._labels = {name: dict(values) for name, values in labels.items()}
        self._access = access
        self.max_clusters = max_clusters

    def allows(self, identity: Identity, cluster: str) -> bool:
        """Whether ``identity`` may still use ``cluster`` (re-checked before every leg reconnect)."""
        return self._access.allows(identity, cluster)

    def resolve(self, identity: Identity, selection: ClusterSelection) -> Resolution:
        """The clusters ``selection`` covers for ``identity``; invalid_argument names the field."""
        names = list(selection.clusters)
        if len(names) > self.max_clusters:
            raise InvalidFanoutRequestError(
                f"selection.clusters names {len(names)} clusters; the limit is {self.max_clusters} per call "
                "(fanout.max_clusters_per_call in otterscale.yaml)"
            )
        for name in names:
            if not name or len(name) > MAX_NAME_CHARS:
                raise InvalidFanoutRequestError(
                    f"selection.clusters: {echo(name)} is not a cluster name "
                    f"(1 to {MAX_NAME_CHARS} characters)"
                )
        try:
            selector = LabelSelector.parse(selection.label_selector)
        except LabelSyntaxError as exc:
            raise InvalidFanoutRequestError(f"selection.label_selector: {exc}") from None
        allowed = self._access.allowed(identity)
        if names:
            wanted = set(names)
            chosen = sorted(name for name in wanted if name in allowed)
            unknown = tuple(sorted(wanted.difference(chosen)))
        else:
            chosen = sorted(allowed)
            unknown = ()
        if selector:
            chosen = [name for name in chosen if selector.matches(self._labels[name])]
        if len(chosen) > self.max_clusters:
            raise InvalidFanoutRequestError(
                f"the selection covers {len(chosen)} clusters; the limit is {self.max_clusters} per call "
                "(fanout.max_clusters_per_call in otterscale.yaml): select fewer"
            )
        return Resolution(tuple(chosen), unknown, frozenset(n for n in unknown if n in self._labels))
