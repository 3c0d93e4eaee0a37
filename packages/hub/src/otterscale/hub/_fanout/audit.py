"""The fan-out calls' part in the audit trail (:mod:`.._audit`): what they name, and per cluster
how each leg ended.

The trail writes one event per call (a MultiList page, a whole MultiWatch stream) when it ends;
a fan-out request names its resource in a nested ``query`` and its clusters by selection, so the
handler records both on the running call (:func:`.._observe.current_call`) before it ends: the
resource as the event's target, and per cluster an :class:`AuditClusterOutcome` (outcome, items
listed or events read, leg latency, watch reconnects). A cluster the caller named but may not use
is recorded as ``permission_denied`` (the caller was told ``unknown_cluster``), so the trail shows
probing. The request id the event carries also went to every cluster's agent with its leg, which
joins the call across the hub's and the agents' logs. Never object content, tokens, cursors or
continue tokens.

A debug log line repeats the call's extra facts (pages, reconnects, resyncs, why a stream ended).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from otterscale.common import AuditClusterOutcome, AuditTarget, Identity
from otterscale.resource.v1.multicluster_pb2 import ClusterStatus

from .._observe import current_call
from .query import Query
from .selection import Resolution

logger = logging.getLogger(__name__)


def name_target(query: Query) -> None:
    """Record the resource a fan-out call reads as its audit target (no cluster: it has many)."""
    call = current_call()
    if call is not None:
        call.target = AuditTarget(
            group=query.group, version=query.version, resource=query.resource, namespace=query.namespace
        )


def outcome_name(outcome: int) -> str:
    """``OUTCOME_UNAVAILABLE`` as the audit trail spells outcomes: ``unavailable``."""
    return ClusterStatus.Outcome.Name(outcome).removeprefix("OUTCOME_").lower() if outcome else ""


def record(
    rpc: str,
    identity: Identity,
    resolution: Resolution,
    clusters: Mapping[str, AuditClusterOutcome],
    **fields: Any,
) -> None:
    """Give the running call its per-cluster outcomes, those the caller was told (``fields`` go
    to the debug line only and must hold no secret)."""
    outcomes = {
        name: AuditClusterOutcome("permission_denied") if name in resolution.denied else outcome
        for name, outcome in clusters.items()
    }
    call = current_call()
    if call is not None:
        call.clusters = outcomes
    logger.debug("fan-out %s by %s: %s", rpc, identity.subject, fields)
