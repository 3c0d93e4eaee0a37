"""Which clusters a caller may use through this hub: the ``access`` allow-lists of otterscale.yaml.

Allow-lists restrict, they never grant: a caller allowed on a cluster still needs that cluster's
RBAC (the agent impersonates the caller there). Without an ``access`` section every caller may
use every cluster (the original behaviour). With one, a caller matched by one or more rules (by
subject, or by any of its groups) may use the union of those rules' clusters; a caller matched by
none may use every cluster when ``default`` is ``all``, none when it is ``none``.

Each rule's cluster set is computed once from the configuration (names, globs, label selector),
so a check is a set lookup: a cluster a caller may not use and one that does not exist are told
apart by nothing, neither the answer nor the time it takes (fanout.md 3.3).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from otterscale.common import AccessConfig, Identity, LabelSelector

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Rule:
    subjects: frozenset[str]
    groups: frozenset[str]
    clusters: frozenset[str]

    def applies(self, identity: Identity) -> bool:
        return identity.subject in self.subjects or not self.groups.isdisjoint(identity.groups)


class AccessPolicy:
    """The clusters each caller may use (see the module docstring); immutable."""

    def __init__(self, access: AccessConfig | None, labels: Mapping[str, Mapping[str, str]]) -> None:
        names = frozenset(labels)
        self._everything = names
        self._default = names if access is None or access.default == "all" else frozenset()
        self._rules: tuple[_Rule, ...] = ()
        if access is None:
            return
        rules = []
        for rule in access.rules:
            chosen = {name for name in names if any(fnmatch.fnmatchcase(name, g) for g in rule.clusters)}
            if rule.cluster_labels is not None:
                selector = LabelSelector.parse(rule.cluster_labels)
                chosen |= {name for name in names if selector.matches(labels[name])}
            rules.append(_Rule(frozenset(rule.subjects), frozenset(rule.groups), frozenset(chosen)))
        self._rules = tuple(rules)

    @property
    def restricted(self) -> bool:
        """Whether any caller may be refused a configured cluster."""
        return bool(self._rules) or self._default != self._everything

    def allowed(self, identity: Identity) -> frozenset[str]:
        """The configured clusters ``identity`` may use."""
        matched = [rule.clusters for rule in self._rules if rule.applies(identity)]
        if not matched:
            return self._default
        return frozenset().union(*matched)

    def allows(self, identity: Identity, cluster: str) -> bool:
        """Whether ``identity`` may use ``cluster`` (False for clusters that are not configured)."""
        return cluster in self.allowed(identity)
