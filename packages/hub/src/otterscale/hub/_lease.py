"""Leader election settings: which Lease, for whom, with which timings (nothing of Kubernetes here).

Read by the command line (``otterscale server --leader-elect``), which must start fast, and by
the election itself (:mod:`._election`), which runs inside Envoy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

DEFAULT_LEASE_NAME = "otterscale-server-leader"
DEFAULT_LEADER_LABEL = "otterscale.io/leader"
DEFAULT_LEASE_DURATION = 15.0
DEFAULT_RENEW_DEADLINE = 10.0
DEFAULT_RETRY_PERIOD = 2.0
#: The library's jitter factor: renew_deadline must exceed it times retry_period.
JITTER_FACTOR = 1.2


@dataclass(frozen=True, slots=True)
class ElectionSettings:
    """Who campaigns for which Lease, and the timings (the original's 15 s / 10 s / 2 s).

    ``identity`` is the holder name written into the Lease: the Pod name (``POD_NAME``) when
    there is one, which is also ``pod_name``, the Pod the leader labels with ``leader_label`` and
    whose IP followers forward to. Without a Pod (``pod_name`` None) the election still works,
    but nothing is labelled and followers cannot find the leader's address.
    """

    namespace: str
    identity: str
    pod_name: str | None = None
    lease_name: str = DEFAULT_LEASE_NAME
    leader_label: str = DEFAULT_LEADER_LABEL
    lease_duration: float = DEFAULT_LEASE_DURATION
    renew_deadline: float = DEFAULT_RENEW_DEADLINE
    retry_period: float = DEFAULT_RETRY_PERIOD
    kubeconfig: str | None = None
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable)."""
        found = []
        if not self.namespace:
            found.append("the namespace of the Lease is empty")
        if not self.identity:
            found.append("the identity is empty")
        if self.retry_period < 1:
            found.append(f"the retry period must be at least 1s (got {self.retry_period:g}s)")
        if self.renew_deadline <= JITTER_FACTOR * self.retry_period:
            found.append(
                f"the renew deadline ({self.renew_deadline:g}s) must exceed {JITTER_FACTOR:g} x the retry "
                f"period ({self.retry_period:g}s)"
            )
        if self.lease_duration <= self.renew_deadline:
            found.append(
                f"the lease duration ({self.lease_duration:g}s) must exceed the renew deadline "
                f"({self.renew_deadline:g}s)"
            )
        return found


def service_account_namespace(path: str = SERVICE_ACCOUNT_NAMESPACE_FILE) -> str | None:
    """The namespace of the in-cluster service account, or None outside a Pod."""
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
