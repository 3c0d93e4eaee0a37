"""MultiList: one page of a traversal of many clusters, with per-cluster outcomes and one cursor.

Per page (fanout.md 2.5, with the choices below):

1. The clusters are resolved again (:mod:`.selection`): a cursor never decides who may see what.
2. The cursor (:mod:`.tokens`, bound to the caller and the query) gives each cluster's state:
   not started (no entry), *active* (its snapshot resourceVersion and Kubernetes continue token),
   *done* (its snapshot resourceVersion) or *failed* (its final outcome).
3. **ORDER_FAIR**: unfinished clusters take turns, round-robin in name order across pages: each
   page serves the next ``min(W, limit / 100)`` of them (``W`` = ``max_concurrency``; at least one),
   which share the page's ``limit`` evenly (a hard maximum) and run in parallel, so a page takes
   about as long as its slowest leg and nothing fetched is thrown away (no leg asks for more than
   its share). Why at least 100 items a leg (:data:`MIN_LEG_ITEMS`): every leg is a round trip
   through a tunnel, an agent and a kube-apiserver; a page of 500 over 20 clusters as 20 legs of
   25 items costs four times the round trips of 5 legs of 100 for the same items (measured in
   ``nox -s bench``: the paged traversal took 3.5 x the unpaged one, against 2 x the target).
   **ORDER_CLUSTER_MAJOR**: clusters one after another in name order, each asked for what is left
   of the page; a cluster's continue token ends the page.
4. Each leg is an ordinary List to that cluster's agent as the caller (:mod:`.legs`), within
   ``min(per_cluster_timeout, the call's deadline - 50 ms)``, after waiting its turn for one of the
   cluster's in-flight slots (:mod:`.budget`). The answers are spliced into the page unchanged
   (:mod:`.wire`).
5. Bytes: the page may hold ``limits.max_response_bytes``; each leg gets an equal share (at least
   1 MiB). A leg whose answer is over its share is asked again for half as many items (never
   truncated: a Kubernetes page cannot be cut without losing its continue position); one object
   alone may use the whole page. The cursor remembers each cluster's bytes per item, so its next
   page asks for a number of items that fits.

Failures never fail the page (unless ``require_all``): the cluster's outcome is in ``statuses``.
Retries: in ORDER_FAIR a cluster that failed in a way that costs nothing to try again
(UNAVAILABLE, THROTTLED, not attempted for lack of time) is tried again on the next pages of the
traversal, at most :data:`MAX_ATTEMPTS` times, but never makes the traversal longer: a page that
would hold nothing but retries finalises them instead. TIMEOUT is final (a black-holed cluster
would otherwise cost its timeout on every page). In ORDER_CLUSTER_MAJOR every failure is final
(retrying later would break the order). EXPIRED (the cluster's snapshot was compacted away) starts
the cluster over with a fresh snapshot if it had contributed no item yet, else is final (starting
over would repeat items).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]

from otterscale.common import AuditClusterOutcome, Identity
from otterscale.resource.v1.multicluster_pb2 import (
    ClusterResourceVersion,
    ClusterSelection,
    ClusterStatus,
    MultiListRequest,
    MultiListResponse,
    Progress,
)

from .._codec import RawMessage
from . import wire
from .audit import name_target, outcome_name, record
from .budget import ClusterLanes, SubjectLegs
from .errors import InvalidFanoutRequestError, RequireAllError
from .legs import RETRYABLE, AgentLegs, LegFailure, ResponseTooLarge, short, timed_out
from .metrics import FanoutMetrics
from .query import Query, checked_options
from .selection import ClusterDirectory, Resolution
from .tokens import CURSOR, RESUME, TokenSealer, binding_digest

logger = logging.getLogger(__name__)

Outcome = ClusterStatus.Outcome

#: Tries of a cluster per traversal for outcomes the hub retries (ORDER_FAIR).
MAX_ATTEMPTS = 3
#: A page is answered this long before the call's deadline.
DEADLINE_MARGIN = 0.05
#: A leg is not started with less time than this left (it is NOT_ATTEMPTED instead).
MIN_LEG_SECONDS = 0.02
#: The smallest byte share of one leg.
MIN_LEG_BYTES = 1024 * 1024
#: ORDER_FAIR: the fewest items a leg asks for (unless the page's limit is smaller).
MIN_LEG_ITEMS = 100
#: Outcomes the hub itself tries again on a later page (ORDER_FAIR).
_HUB_RETRIES = frozenset(
    {Outcome.OUTCOME_UNAVAILABLE, Outcome.OUTCOME_THROTTLED, Outcome.OUTCOME_NOT_ATTEMPTED}
)

ACTIVE, DONE, FAILED = "a", "d", "f"


@dataclass(frozen=True, slots=True)
class ListSettings:
    """Defaults and bounds of MultiList (from ``fanout`` and ``limits`` in otterscale.yaml)."""

    per_cluster_timeout: float = 10.0
    default_concurrency: int = 32
    max_concurrency: int = 128
    default_page_items: int = 500
    max_page_items: int = 100_000
    cursor_ttl: float = 600.0
    page_bytes: int = 64 * 1024 * 1024
    default_deadline: float = 30.0


@dataclass(slots=True)
class Entry:
    """One cluster's place in a traversal (what the cursor keeps)."""

    state: str = ACTIVE
    rv: str = ""
    cont: str = ""
    items: int = 0
    attempts: int = 0
    outcome: int = 0
    code: str = ""
    bytes_per_item: int = 0
    remaining: int = -1

    def pack(self, name: str) -> list[Any]:
        if self.state == DONE:
            return [name, DONE, self.rv]
        if self.state == FAILED:
            return [name, FAILED, self.outcome, self.code]
        packed = [
            name,
            ACTIVE,
            self.rv,
            self.cont,
            self.items,
            self.attempts,
            self.bytes_per_item,
            self.remaining,
        ]
        if self.attempts:  # waiting for a retry: what it last failed with, its outcome if it stays failed
            packed += [self.outcome, self.code]
        return packed

    def final_status(self, name: str, message: str) -> ClusterStatus:
        """The status of a cluster that failed for good on an earlier page (its outcome kept)."""
        return ClusterStatus(
            cluster=name,
            outcome=self.outcome,  # type: ignore[arg-type]
            message=message,
            code=self.code,
            retryable=self.outcome in RETRYABLE,
            final=True,
        )

    @classmethod
    def unpack(cls, packed: Sequence[Any]) -> tuple[str, Entry]:
        name, state = str(packed[0]), packed[1]
        if state == DONE:
            return name, cls(DONE, rv=str(packed[2]))
        if state == FAILED:
            return name, cls(FAILED, outcome=int(packed[2]), code=str(packed[3]))
        rv, cont, items, attempts, bpi, remaining = packed[2:8]
        outcome, code = (int(packed[8]), str(packed[9])) if len(packed) > 9 else (0, "")
        return name, cls(
            ACTIVE, str(rv), str(cont), int(items), int(attempts), outcome, code, int(bpi), int(remaining)
        )


@dataclass(slots=True)
class _Leg:
    """The result of one cluster in this page."""

    name: str
    data: bytes = b""
    meta: wire.ListMeta | None = None
    failure: LegFailure | None = None
    latency: float = 0.0
    restarted: bool = False


@dataclass(slots=True)
class _Page:
    lists: list[tuple[str, bytes]] = field(default_factory=list)
    statuses: list[ClusterStatus] = field(default_factory=list)
    dialled: int = 0
    #: ORDER_FAIR: the last cluster this traversal served (the next page starts after it).
    served_last: str = ""


class MultiLister:
    """Serves MultiList pages (see the module docstring)."""

    def __init__(
        self,
        *,
        legs: AgentLegs,
        directory: ClusterDirectory,
        sealer: TokenSealer,
        lanes: ClusterLanes,
        subject_legs: SubjectLegs,
        settings: ListSettings,
        metrics: FanoutMetrics | None = None,
    ) -> None:
        self._metrics = metrics or FanoutMetrics()
        self._legs = legs
        self._directory = directory
        self._sealer = sealer
        self._lanes = lanes
        self._subject_legs = subject_legs
        self._settings = settings

    async def page(
        self, identity: Identity, request: MultiListRequest, codec: str, deadline_in: float | None
    ) -> bytes:
        """One page as the ``codec``'s bytes of a MultiListResponse; raises Hub/Connect errors.

        ``deadline_in``: seconds left of the call's deadline (None: the default deadline).
        """
        settings = self._settings
        started = time.monotonic()
        deadline = started + (deadline_in if deadline_in is not None else settings.default_deadline)
        query = Query.from_message(request.query)
        name_target(query)
        per_cluster_timeout, concurrency, require_all = checked_options(
            request.options,
            settings.per_cluster_timeout,
            settings.default_concurrency,
            settings.max_concurrency,
        )
        if request.limit < 0 or request.limit > settings.max_page_items:
            raise InvalidFanoutRequestError(
                f"limit must be between 0 and {settings.max_page_items} "
                "(fanout.max_page_items in otterscale.yaml)"
            )
        limit = request.limit or settings.default_page_items
        order = request.order or MultiListRequest.ORDER_FAIR
        if order not in (MultiListRequest.ORDER_FAIR, MultiListRequest.ORDER_CLUSTER_MAJOR):
            raise InvalidFanoutRequestError(f"order {request.order} is not a known MultiListRequest.Order")
        resolution = self._directory.resolve(identity, request.selection)
        binding = cursor_binding(request.selection, query, order)
        entries: dict[str, Entry] = {}
        returned = 0
        served_last = ""
        first = not request.cursor
        if request.cursor:
            payload = self._sealer.open(
                CURSOR, request.cursor, identity.subject, binding, max_age=settings.cursor_ttl
            )
            try:
                entries = dict(Entry.unpack(packed) for packed in payload["e"])
                returned = int(payload["n"])
                served_last = str(payload.get("k", ""))
            except (KeyError, IndexError, TypeError, ValueError):  # a hub bug: it sealed it
                logger.error("a MultiList cursor authenticated but its content cannot be read")
                raise InvalidFanoutRequestError("the cursor cannot be read; start again without it") from None

        page = _Page(served_last=served_last)
        gone = sorted(set(entries).difference(resolution.clusters))
        for name in gone:  # no longer configured or allowed: same answer as a name that never was
            del entries[name]
            page.statuses.append(_unknown(name))
        args = (identity, query, codec, deadline, per_cluster_timeout)
        if order == MultiListRequest.ORDER_FAIR:
            await self._fair(page, resolution.clusters, entries, limit, concurrency, require_all, *args)
        else:
            await self._cluster_major(page, resolution.clusters, entries, limit, *args)

        returned += sum(status.items for status in page.statuses)
        unfinished = [name for name in resolution.clusters if entries.get(name, Entry()).state == ACTIVE]
        last = not unfinished
        skipped = [s for s in page.statuses if s.outcome == Outcome.OUTCOME_NOT_ATTEMPTED]
        if skipped and len(skipped) == len(page.statuses):
            raise ConnectError(
                Code.DEADLINE_EXCEEDED,
                "the call's deadline passed before any cluster could be asked; allow more time",
            )
        if first or last:
            page.statuses.extend(_unknown(name) for name in resolution.unknown)
        if last:
            touched = {status.cluster for status in page.statuses}
            for name in resolution.clusters:
                entry = entries[name]
                if entry.state == FAILED and name not in touched:
                    page.statuses.append(
                        entry.final_status(name, "failed on an earlier page of this traversal")
                    )
        _record(identity, query, resolution, page, started, first=first, last=last)
        for status in page.statuses:
            self._metrics.outcomes.labels(rpc="MultiList", outcome=Outcome.Name(status.outcome)).inc()
        if require_all:
            failed = [
                s
                for s in page.statuses
                if s.outcome not in (Outcome.OUTCOME_OK, Outcome.OUTCOME_NOT_ATTEMPTED)
            ]
            if failed:
                names = ", ".join(s.cluster for s in failed[:10]) + (" ..." if len(failed) > 10 else "")
                raise _require_all_error(
                    f"require_all: {len(failed)} clusters did not answer OK ({names})", failed
                )

        response = MultiListResponse(
            statuses=page.statuses, progress=_progress(resolution, entries, returned)
        )
        if unfinished:
            response.next_cursor = self._sealer.seal(
                CURSOR,
                identity.subject,
                binding,
                {
                    "e": [entries[name].pack(name) for name in sorted(entries)],
                    "n": returned,
                    "k": page.served_last,
                },
            )
        else:
            versions = {name: entries[name].rv for name in resolution.clusters if entries[name].state == DONE}
            response.resource_versions.extend(
                ClusterResourceVersion(cluster=name, resource_version=rv) for name, rv in versions.items()
            )
            response.resume = self.seal_resume(identity.subject, query, versions)
        return wire.list_page(codec, page.lists, response)

    def seal_resume(self, subject: str, query: Query, versions: dict[str, str]) -> str:
        """A MultiWatch resume token for ``versions`` (cluster -> resourceVersion)."""
        return self._sealer.seal(RESUME, subject, resume_binding(query), {"r": versions})

    # ----------------------------------------------------------------------------------------------
    # Orders

    async def _fair(
        self,
        page: _Page,
        clusters: Sequence[str],
        entries: dict[str, Entry],
        limit: int,
        concurrency: int,
        require_all: bool,
        identity: Identity,
        query: Query,
        codec: str,
        deadline: float,
        per_cluster_timeout: float,
    ) -> None:
        unfinished = [name for name in clusters if entries.get(name, Entry()).state == ACTIVE]
        # Round-robin across pages: start after the cluster the previous page served last.
        pivot = next((i for i, name in enumerate(unfinished) if name > page.served_last), 0)
        unfinished = unfinished[pivot:] + unfinished[:pivot]
        # Clusters waiting only for a retry never make the traversal longer (see the docstring).
        fresh = [name for name in unfinished if entries.get(name, Entry()).attempts == 0]
        retries = [name for name in unfinished if name not in fresh]
        if not fresh:
            for name in retries:
                entry = entries[name]
                entry.state = FAILED
                message = "still failing after earlier pages of this traversal; not tried again"
                page.statuses.append(entry.final_status(name, message))
            return
        # Legs of at least MIN_LEG_ITEMS items: a page of 500 over 20 clusters as 20 legs of 25
        # would pay 20 round trips for what 5 legs of 100 return. A cluster whose agent is not
        # connected is answered from the hub's state and takes no leg.
        slots = min(concurrency, max(1, limit // MIN_LEG_ITEMS))
        dial: list[str] = []
        for name in fresh + retries:
            if len(dial) == slots:
                break
            entry = entries.setdefault(name, Entry())
            page.served_last = name
            if self._legs.connected(name):
                dial.append(name)
            else:
                self._failed(page, name, entry, _not_connected(name), 0.0, retry=not require_all)
        if not dial:
            return
        # The page's item budget, split as evenly as it goes: ``limit`` is a hard maximum, so with
        # fewer items than clusters only the first ``limit`` clusters advance on this page.
        dial = dial[:limit]
        base, extra = divmod(limit, len(dial))
        shares = {name: base + (1 if i < extra else 0) for i, name in enumerate(dial)}
        byte_share = max(self._settings.page_bytes // len(dial), MIN_LEG_BYTES)
        self._subject_legs.acquire(identity.subject, len(dial))
        page.dialled = len(dial)
        try:
            results = await asyncio.gather(
                *(
                    self._leg(
                        name,
                        entries[name],
                        shares[name],
                        byte_share,
                        identity,
                        query,
                        codec,
                        deadline,
                        per_cluster_timeout,
                    )
                    for name in dial
                )
            )
        finally:
            self._subject_legs.release(identity.subject, len(dial))
        for leg in results:
            self._apply(page, leg, entries[leg.name], retry=not require_all)

    async def _cluster_major(
        self,
        page: _Page,
        clusters: Sequence[str],
        entries: dict[str, Entry],
        limit: int,
        identity: Identity,
        query: Query,
        codec: str,
        deadline: float,
        per_cluster_timeout: float,
    ) -> None:
        budget = limit
        for name in clusters:
            entry = entries.setdefault(name, Entry())
            if entry.state != ACTIVE:
                continue
            if budget <= 0:
                break
            if deadline - DEADLINE_MARGIN - time.monotonic() < MIN_LEG_SECONDS:
                page.statuses.append(_not_attempted(name))
                break
            if not self._legs.connected(name):
                self._failed(page, name, entry, _not_connected(name), 0.0, retry=False)
                continue
            self._subject_legs.acquire(identity.subject, 1)
            page.dialled += 1
            try:
                leg = await self._leg(
                    name,
                    entry,
                    budget,
                    self._settings.page_bytes,
                    identity,
                    query,
                    codec,
                    deadline,
                    per_cluster_timeout,
                )
            finally:
                self._subject_legs.release(identity.subject, 1)
            self._apply(page, leg, entry, retry=False)
            if leg.meta is not None:
                budget -= leg.meta.items
                if leg.meta.continue_token:
                    break  # the rest of this cluster comes first on the next page
            elif leg.failure is not None and leg.failure.outcome == Outcome.OUTCOME_NOT_ATTEMPTED:
                break

    # ----------------------------------------------------------------------------------------------
    # One leg

    async def _leg(
        self,
        name: str,
        entry: Entry,
        share: int,
        byte_share: int,
        identity: Identity,
        query: Query,
        codec: str,
        deadline: float,
        per_cluster_timeout: float,
    ) -> _Leg:
        started = time.monotonic()
        left = deadline - DEADLINE_MARGIN - started
        if left < MIN_LEG_SECONDS:
            return _Leg(
                name, failure=LegFailure(Outcome.OUTCOME_NOT_ATTEMPTED, "the call's deadline came first")
            )
        budget = min(per_cluster_timeout, left)
        leg_deadline = started + budget
        items = share
        if entry.bytes_per_item > 0:
            items = max(1, min(items, byte_share // entry.bytes_per_item))
        max_bytes = byte_share
        restarted = False
        while True:
            request = query.list_request(name, items, entry.cont)
            try:
                async with asyncio.timeout(max(0.0, leg_deadline - time.monotonic())):
                    async with self._lanes.slot(name, identity.subject):
                        remaining = leg_deadline - time.monotonic()
                        if remaining <= 0:
                            raise TimeoutError
                        data = await self._legs.list(
                            name,
                            identity,
                            RawMessage(wire.encode(request, codec), codec),
                            within=remaining,
                            max_bytes=max_bytes,
                        )
            except TimeoutError:
                return _Leg(name, failure=timed_out(budget), latency=time.monotonic() - started)
            except ResponseTooLarge:
                if items > 1:
                    items = max(1, items // 2)
                    if items == 1:
                        max_bytes = self._settings.page_bytes  # one object may use the whole page
                    continue
                return _Leg(
                    name,
                    failure=LegFailure(
                        Outcome.OUTCOME_ERROR,
                        "one object is larger than the hub's limit (limits.max_response_bytes)",
                    ),
                    latency=time.monotonic() - started,
                )
            except LegFailure as failure:
                if (
                    failure.outcome == Outcome.OUTCOME_EXPIRED
                    and entry.cont
                    and entry.items == 0
                    and not restarted
                ):
                    # Nothing of the expired snapshot was returned: start over with a fresh one.
                    entry.cont, entry.rv, restarted = "", "", True
                    continue
                return _Leg(name, failure=failure, latency=time.monotonic() - started, restarted=restarted)
            try:
                meta = wire.scan_list(data, codec)
            except wire.WireError as exc:
                logger.warning("cluster %s: the agent's List answer cannot be read: %s", name, exc)
                return _Leg(
                    name,
                    failure=LegFailure(Outcome.OUTCOME_ERROR, "the agent's answer cannot be read"),
                    latency=time.monotonic() - started,
                )
            return _Leg(name, data=data, meta=meta, latency=time.monotonic() - started, restarted=restarted)

    def _apply(self, page: _Page, leg: _Leg, entry: Entry, *, retry: bool) -> None:
        if leg.failure is not None:
            self._failed(page, leg.name, entry, leg.failure, leg.latency, retry=retry)
            return
        meta = leg.meta
        assert meta is not None
        if not entry.rv:
            entry.rv = meta.resource_version
        entry.items += meta.items
        entry.cont = meta.continue_token
        entry.remaining = meta.remaining if meta.continue_token else 0
        if meta.items:
            entry.bytes_per_item = max(1, len(leg.data) // meta.items)
        entry.attempts = 0
        entry.state = ACTIVE if meta.continue_token else DONE
        page.lists.append((leg.name, leg.data))
        message = "started over with a fresh snapshot: the previous one expired" if leg.restarted else ""
        page.statuses.append(
            ClusterStatus(
                cluster=leg.name,
                outcome=Outcome.OUTCOME_OK,
                message=message,
                latency=_duration(leg.latency),
                items=meta.items,
                final=entry.state == DONE,
            )
        )

    def _failed(
        self, page: _Page, name: str, entry: Entry, failure: LegFailure, latency: float, *, retry: bool
    ) -> None:
        final = True
        if failure.outcome == Outcome.OUTCOME_NOT_ATTEMPTED:
            final = False  # not a failure of the cluster: it keeps its place
        elif retry and failure.outcome in _HUB_RETRIES:
            entry.attempts += 1
            final = entry.attempts >= MAX_ATTEMPTS
        if final:
            entry.state = FAILED
        entry.outcome = failure.outcome
        entry.code = failure.code
        page.statuses.append(
            ClusterStatus(
                cluster=name,
                outcome=failure.outcome,  # type: ignore[arg-type]
                message=failure.message,
                code=failure.code,
                retryable=failure.retryable,
                latency=_duration(latency),
                final=final,
            )
        )


def cursor_binding(selection: ClusterSelection, query: Query, order: int) -> bytes:
    """What a cursor is bound to: the selection as the caller wrote it, the query and the order."""
    names = sorted(set(selection.clusters))
    return binding_digest("MultiList", names, selection.label_selector, query.key(), order)


def resume_binding(query: Query) -> bytes:
    """What a resume token is bound to: the query only (the selection may differ between the
    MultiList and the MultiWatch; clusters a token does not name follow ``initial_events``)."""
    return binding_digest("MultiWatch", query.key())


def _unknown(name: str) -> ClusterStatus:
    return ClusterStatus(
        cluster=name, outcome=Outcome.OUTCOME_UNKNOWN_CLUSTER, message="no such cluster", final=True
    )


def _not_attempted(name: str) -> ClusterStatus:
    return ClusterStatus(
        cluster=name,
        outcome=Outcome.OUTCOME_NOT_ATTEMPTED,
        message="the call's deadline came first; it continues on the next page",
        retryable=True,
    )


def _not_connected(name: str) -> LegFailure:
    return LegFailure(Outcome.OUTCOME_UNAVAILABLE, short(f"the agent of cluster {name!r} is not connected"))


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _progress(resolution: Resolution, entries: dict[str, Entry], returned: int) -> Progress:
    done = failed = 0
    remaining = 0
    known = True
    for name in resolution.clusters:
        entry = entries.get(name)
        if entry is None:
            known = False
        elif entry.state == DONE:
            done += 1
        elif entry.state == FAILED:
            failed += 1
        elif entry.remaining < 0:
            known = False
        else:
            remaining += entry.remaining
    return Progress(
        clusters_total=resolution.total,
        clusters_done=done,
        clusters_failed=failed + len(resolution.unknown),
        items_returned=returned,
        remaining_estimate=remaining if known else -1,
    )


def _require_all_error(message: str, statuses: Sequence[ClusterStatus]) -> RequireAllError:
    error = RequireAllError(message)
    error.details = list(statuses)  # type: ignore[attr-defined]
    return error


def _record(
    identity: Identity,
    query: Query,
    resolution: Resolution,
    page: _Page,
    started: float,
    *,
    first: bool,
    last: bool,
) -> None:
    record(
        "MultiList",
        identity,
        resolution,
        {
            status.cluster: AuditClusterOutcome(
                outcome_name(status.outcome),
                items=status.items,
                duration_ms=round(status.latency.ToNanoseconds() / 1e6, 1),
            )
            for status in page.statuses
        },
        query=query.describe(),
        asked=len(resolution.clusters),
        first_page=first,
        last_page=last,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )
