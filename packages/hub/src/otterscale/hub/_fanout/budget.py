"""The fan-out's shared budgets: legs per subject, legs in flight per cluster, Watch legs per hub.

One request becomes up to ``fanout.max_clusters_per_call`` impersonated requests, so these
bounds are security controls (fanout.md 3.4), not only performance knobs:

- :class:`SubjectLegs`: the legs one authenticated subject holds at once (MultiList legs in
  flight plus open MultiWatch legs), ``fanout.max_legs_per_subject``; and the hub's open Watch
  legs, ``fanout.max_watch_legs``. Past them a call is refused (resource_exhausted naming the key),
  never queued without bound.
- :class:`ClusterLanes`: List legs in flight to one cluster, all callers together,
  ``fanout.max_inflight_per_cluster``, so fleet-wide scans by many users cannot pile onto one
  kube-apiserver. A leg beyond it waits; waiting legs are served round-robin by subject (a small
  version of Kubernetes' API priority and fairness): a user scanning 1,000 clusters gets the
  same turns on each cluster as a user listing three. The wait counts against the leg's timeout.
  And List legs in flight in the whole hub, ``fanout.max_inflight_legs``: a page over 1,000
  clusters at once would keep the hub's event loop so busy that its own health probes of the
  agents time out (measured: the prober then marked hundreds of connected agents unreachable).

Pure bookkeeping on the event loop: no locks, no tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from .errors import FanoutLimitError
from .metrics import FanoutMetrics

logger = logging.getLogger(__name__)

#: ``reason`` labels of ``otterscale_hub_limit_refusals_total`` for the fan-out's own limits.
LEGS_PER_SUBJECT = "fanout_legs_per_subject"
WATCH_LEGS = "fanout_watch_legs"


class SubjectLegs:
    """Legs held per subject and Watch legs held in total (see the module docstring)."""

    def __init__(
        self, per_subject: int, watch_total: int, *, on_refused: Callable[[str], None] | None = None
    ) -> None:
        self.per_subject = per_subject
        self.watch_total = watch_total
        self._on_refused = on_refused
        self._held: dict[str, int] = {}
        self._watch_legs = 0

    def held(self, subject: str) -> int:
        """Legs ``subject`` holds now."""
        return self._held.get(subject, 0)

    @property
    def watch_legs(self) -> int:
        """Watch legs open in this hub."""
        return self._watch_legs

    def acquire(self, subject: str, count: int, *, watch: bool = False) -> None:
        """Take ``count`` legs for ``subject``; :class:`FanoutLimitError` if over a limit."""
        held = self._held.get(subject, 0)
        if held + count > self.per_subject:
            self._refused(LEGS_PER_SUBJECT)
            raise FanoutLimitError(
                f"this call needs {count} legs and the caller holds {held}: the hub's limit is "
                f"{self.per_subject} per subject (fanout.max_legs_per_subject in otterscale.yaml); "
                "wait for other calls to end or select fewer clusters"
            )
        if watch and self._watch_legs + count > self.watch_total:
            self._refused(WATCH_LEGS)
            raise FanoutLimitError(
                f"this hub holds {self._watch_legs} MultiWatch legs and this call needs {count}: the "
                f"limit is {self.watch_total} (fanout.max_watch_legs in otterscale.yaml); retry later"
            )
        self._held[subject] = held + count
        if watch:
            self._watch_legs += count

    def _refused(self, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)

    def release(self, subject: str, count: int, *, watch: bool = False) -> None:
        """Give back legs taken by :meth:`acquire`."""
        held = self._held.get(subject, 0) - count
        if held <= 0:
            self._held.pop(subject, None)
        else:
            self._held[subject] = held
        if watch:
            self._watch_legs = max(0, self._watch_legs - count)


class _Lane:
    """One cluster: legs in flight, and waiting legs per subject in round-robin order."""

    __slots__ = ("inflight", "waiting")

    def __init__(self) -> None:
        self.inflight = 0
        self.waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def grant_next(self) -> bool:
        """Hand the slot just freed to the next waiting subject's oldest leg; False if none waits."""
        while self.waiting:
            subject, queue = next(iter(self.waiting.items()))
            future = queue.popleft()
            if queue:
                self.waiting.move_to_end(subject)  # this subject had its turn: to the back
            else:
                del self.waiting[subject]
            if not future.done():
                future.set_result(None)
                return True
        return False


class ClusterLanes:
    """At most ``per_cluster`` List legs in flight per cluster (see the module docstring)."""

    def __init__(
        self, per_cluster: int, metrics: FanoutMetrics | None = None, *, total: int = 1_000_000
    ) -> None:
        self.per_cluster = per_cluster
        self._metrics = metrics
        self._total = asyncio.Semaphore(total)
        self._lanes: dict[str, _Lane] = {}
        #: Most legs seen in flight at once per cluster (tests and metrics check the cap).
        self.peak: dict[str, int] = {}

    def inflight(self, cluster: str) -> int:
        """List legs in flight to ``cluster`` now."""
        lane = self._lanes.get(cluster)
        return lane.inflight if lane is not None else 0

    @asynccontextmanager
    async def slot(self, cluster: str, subject: str) -> AsyncIterator[None]:
        """Hold one of the hub's and one of ``cluster``'s slots for the body (waits cancellably)."""
        async with self._total, self._cluster_slot(cluster, subject):
            yield

    @asynccontextmanager
    async def _cluster_slot(self, cluster: str, subject: str) -> AsyncIterator[None]:
        lane = self._lanes.get(cluster)
        if lane is None:
            lane = self._lanes[cluster] = _Lane()
        if lane.inflight < self.per_cluster and not lane.waiting:
            lane.inflight += 1
        else:
            if self._metrics is not None:
                self._metrics.waits.labels(cluster=cluster).inc()
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.waiting.setdefault(subject, deque()).append(future)
            try:
                await future  # the releasing leg keeps inflight as it is and hands its slot over
            except BaseException:
                if future.done() and not future.cancelled():
                    self._release(cluster, lane)  # granted, but cancelled before it could run
                else:
                    queue = lane.waiting.get(subject)
                    if queue is not None and future in queue:
                        queue.remove(future)
                        if not queue:
                            del lane.waiting[subject]
                raise
        peak = self.peak[cluster] = max(self.peak.get(cluster, 0), lane.inflight)
        if self._metrics is not None:
            self._metrics.inflight.labels(cluster=cluster).set(lane.inflight)
            self._metrics.inflight_peak.labels(cluster=cluster).set(peak)
        try:
            yield
        finally:
            self._release(cluster, lane)

    def _release(self, cluster: str, lane: _Lane) -> None:
        if not lane.grant_next():
            lane.inflight -= 1
            if lane.inflight == 0 and not lane.waiting:
                self._lanes.pop(cluster, None)
        if self._metrics is not None:
            self._metrics.inflight.labels(cluster=cluster).set(lane.inflight)
