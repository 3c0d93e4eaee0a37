"""MultiWatch: one stream of many clusters' Watch events, with per-leg recovery and checkpoints.

Each selected cluster has a *leg*: a task that keeps one ResourceService Watch open to that
cluster's agent as the caller (:mod:`.legs`) and puts what it reads, spliced (:mod:`.wire`), into
the leg's own small queue. The stream's consumer (the handler's generator) drains the queues.

**Leg life** (each change is a ClusterStatus in the stream, in order with that leg's events):
CONNECTING, then SYNCED once it is live: after its initial events (the end-of-initial-events
bookmark of Kubernetes WatchList) when it sends them, else at its first event or
:data:`SYNC_GRACE` after the cluster accepted the watch without refusing it. A leg that drops
(agent restart, tunnel cut, Kubernetes ending the watch) reconnects from the resourceVersion of
the last event it read, on its own, with jittered exponential backoff; the other legs never
notice. UNAVAILABLE is reported only when a reconnect cannot be made at once. A 410 (the leg's
resourceVersion is too old) re-lists that cluster in band: RESYNC_START, its current objects as
ADDED events, RESYNC_END (with ``disable_auto_resync``: EXPIRED, and the leg ends). FORBIDDEN,
NOT_SERVED, INVALID and UNAUTHENTICATED park the leg; it tries again every
:data:`PARKED_RETRY` seconds (RBAC can change) and reports SYNCED when that works.

**Without a resume point** a leg follows ``initial_events``: MISSING_ONLY and ALL send the
cluster's current objects first (WatchList); NONE asks the cluster for its current
resourceVersion (a List of one item, as the caller) and watches from there.

**Fair draining and backpressure.** Legs' queues share a byte budget per stream
(:data:`STREAM_QUEUE_BYTES`, at least :data:`MIN_LEG_QUEUE_BYTES` per leg); a leg reads from
its agent only while its queue has room, so a client that reads slowly holds the agents back
through HTTP/2 flow control instead of filling the hub. The consumer serves the legs with
deficit round-robin by bytes (a quantum of :data:`QUANTUM` bytes per turn, at least one message):
a cluster writing 1,000 changes a second gets the same share of the client's bandwidth as each
quiet one, and cannot delay them by more than one turn.

**Checkpoints** (every ``checkpoint_interval``, and as soon as every leg is first SYNCED): a
resume token with, per cluster, the resourceVersion of the last event or bookmark of that cluster
*handed to the client*, so resuming from it may repeat what came after it but never skips an
event. A leg that is in its initial events or re-listing has no entry (resuming re-lists it).

**Ending.** The client cancelling ends every leg at once. When the hub shuts down or stops
leading, the stream sends a last checkpoint and ends with unavailable. The hub opens no new
upstream call for a caller whose token has expired: a leg that needs one ends the stream with
unauthenticated (resume with a fresh token from the last checkpoint); legs that stay up are not
cut at the token's expiry (as single-cluster Watch).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import AuditClusterOutcome, Identity, echo
from otterscale.resource.v1.multicluster_pb2 import (
    Checkpoint,
    ClusterStatus,
    MultiWatchRequest,
    MultiWatchResponse,
)

from .._codec import RawMessage
from .._errors import ShuttingDownError, WatchLimitError
from .._limits import WatchSlots
from .._tasks import cancel_and_wait, spawn
from . import wire
from .audit import name_target, outcome_name, record
from .budget import SubjectLegs
from .errors import InvalidFanoutRequestError
from .legs import AgentLegs, LegFailure, ResponseTooLarge, short
from .listing import resume_binding
from .metrics import FanoutMetrics
from .query import Query, checked_options, duration_seconds
from .selection import ClusterDirectory, Resolution
from .tokens import RESUME, TokenSealer

logger = logging.getLogger(__name__)

Outcome = ClusterStatus.Outcome

#: Bytes queued in the hub per stream, all legs together, and at least per leg.
STREAM_QUEUE_BYTES = 16 * 1024 * 1024
MIN_LEG_QUEUE_BYTES = 16 * 1024
#: Deficit round-robin quantum (bytes a leg may send per turn, at least one message).
QUANTUM = 16 * 1024
#: A leg without initial events counts as SYNCED this long after it opened without a refusal.
SYNC_GRACE = 1.0
#: Reconnect backoff (seconds): first, and most.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
#: A parked leg (FORBIDDEN, NOT_SERVED, ...) tries again this often.
PARKED_RETRY = 300.0
#: Default and bounds of ``checkpoint_interval``.
CHECKPOINT_INTERVAL = 10.0
MIN_CHECKPOINT_INTERVAL = 1.0
MAX_CHECKPOINT_INTERVAL = 3600.0
#: Longest resourceVersion accepted in ``resume_from`` (etcd revisions are 20 digits at most).
MAX_RESOURCE_VERSION_CHARS = 64

_PARKED = frozenset(
    {
        Outcome.OUTCOME_FORBIDDEN,
        Outcome.OUTCOME_NOT_SERVED,
        Outcome.OUTCOME_INVALID,
        Outcome.OUTCOME_UNAUTHENTICATED,
    }
)
#: Markers of a queued item: what the leg's checkpoint entry becomes once it is delivered.
_KEEP = object()
_CLEAR = object()


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """Defaults and bounds of MultiWatch (from ``fanout`` in otterscale.yaml)."""

    per_cluster_timeout: float = 10.0
    default_concurrency: int = 32
    max_concurrency: int = 128


@dataclass(slots=True)
class _Item:
    data: bytes
    checkpoint: object  # a resourceVersion, _KEEP or _CLEAR


@dataclass(eq=False, slots=True)
class _Leg:
    name: str
    rv: str = ""  # where a reconnect resumes (the last event read)
    checkpoint_rv: str | None = None  # the last one delivered (None: no resume point)
    synced: bool = False
    last_outcome: int = 0
    queue: deque[_Item] = field(default_factory=deque)
    queued: int = 0
    deficit: int = 0
    space: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    done: bool = False
    ever_synced: bool = False
    scheduled: bool = False  # in the stream's ready list
    partial_initial: bool = False  # some initial events were delivered, then the watch broke
    progress: bool = False  # the current watch has read an event
    events: int = 0  # watch events read (for the audit record)
    reconnects: int = 0


class _Stream:
    """The shared state of one MultiWatch: legs, the ready list and how the stream must end."""

    def __init__(
        self,
        identity: Identity,
        query: Query,
        codec: str,
        names: tuple[str, ...],
        concurrency: int,
        metrics: FanoutMetrics,
    ) -> None:
        self.metrics = metrics
        self.identity = identity
        self.query = query
        self.codec = codec
        self.legs = {name: _Leg(name) for name in names}
        self.ready: deque[_Leg] = deque()
        self.wake = asyncio.Event()
        self.start_window = asyncio.Semaphore(concurrency)
        self.leg_cap = max(MIN_LEG_QUEUE_BYTES, STREAM_QUEUE_BYTES // max(1, len(names)))
        self.ending: ConnectError | None = None
        self.ending_checkpoint = False
        self.resyncs = 0

    def end(self, error: ConnectError, *, checkpoint: bool = False) -> None:
        if self.ending is None:
            self.ending = error
            self.ending_checkpoint = checkpoint
            self.wake.set()

    def put(self, leg: _Leg, data: bytes, checkpoint: object = _KEEP) -> None:
        leg.queue.append(_Item(data, checkpoint))
        leg.queued += len(data)
        if leg.queued >= self.leg_cap:
            leg.space.clear()
        if not leg.scheduled:
            leg.scheduled = True
            self.ready.append(leg)
            self.wake.set()

    def event(self, leg: _Leg, data: bytes, checkpoint: object) -> None:
        """Queue one of ``leg``'s watch events (the agent's bytes, tagged with its cluster)."""
        leg.events += 1
        self.put(leg, wire.watch_event(self.codec, leg.name, data), checkpoint)

    def status(
        self,
        leg: _Leg,
        outcome: int,
        message: str = "",
        *,
        retryable: bool = False,
        checkpoint: object = _KEEP,
    ) -> None:
        leg.last_outcome = outcome
        self.metrics.outcomes.labels(rpc="MultiWatch", outcome=Outcome.Name(outcome)).inc()
        response = MultiWatchResponse(
            status=ClusterStatus(cluster=leg.name, outcome=outcome, message=message, retryable=retryable)  # type: ignore[arg-type]
        )
        self.put(leg, wire.encode(response, self.codec), checkpoint)

    async def room(self, leg: _Leg) -> None:
        """Wait until ``leg``'s queue is below its share (backpressure towards the agent)."""
        while leg.queued >= self.leg_cap:
            leg.space.clear()
            await leg.space.wait()


class MultiWatcher:
    """Serves MultiWatch streams (see the module docstring)."""

    def __init__(
        self,
        *,
        legs: AgentLegs,
        directory: ClusterDirectory,
        sealer: TokenSealer,
        subject_legs: SubjectLegs,
        watch_slots: WatchSlots,
        settings: WatchSettings,
        on_refused: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        metrics: FanoutMetrics | None = None,
    ) -> None:
        self._metrics = metrics or FanoutMetrics()
        self._legs = legs
        self._directory = directory
        self._sealer = sealer
        self._subject_legs = subject_legs
        self._watch_slots = watch_slots
        self._settings = settings
        self._on_refused = on_refused
        self._clock = clock
        self._streams: set[_Stream] = set()
        self._draining = False

    @property
    def open_streams(self) -> int:
        """MultiWatch streams open now."""
        return len(self._streams)

    def drain(self) -> None:
        """Refuse new streams; end the open ones (last checkpoint, then unavailable): shutdown."""
        self._draining = True
        error = ConnectError(
            Code.UNAVAILABLE, "the hub is shutting down; resume the MultiWatch from the last checkpoint"
        )
        for stream in list(self._streams):
            stream.end(error, checkpoint=True)

    def end_streams(self) -> None:
        """End the open streams (last checkpoint, then unavailable): this replica stopped leading."""
        error = ConnectError(
            Code.UNAVAILABLE,
            "this hub replica stopped leading; resume the MultiWatch from the last checkpoint",
        )
        for stream in list(self._streams):
            stream.end(error, checkpoint=True)

    # ----------------------------------------------------------------------------------------------

    def stream(
        self, identity: Identity, request: MultiWatchRequest, codec: str, *, expires: float | None
    ) -> AsyncGenerator[bytes, None]:
        """Check ``request`` and return the stream's generator (errors about the call raise here)."""
        if self._draining:
            raise ShuttingDownError("the hub is shutting down; retry the MultiWatch elsewhere")
        settings = self._settings
        query = Query.from_message(request.query)
        name_target(query)
        leg_timeout, concurrency, _ = checked_options(
            request.options,
            settings.per_cluster_timeout,
            settings.default_concurrency,
            settings.max_concurrency,
        )
        interval = duration_seconds(
            request.checkpoint_interval, "checkpoint_interval", maximum=MAX_CHECKPOINT_INTERVAL
        )
        if interval is not None and interval < MIN_CHECKPOINT_INTERVAL:
            raise InvalidFanoutRequestError(
                f"checkpoint_interval must be at least {MIN_CHECKPOINT_INTERVAL:g}s"
            )
        initial = request.initial_events or MultiWatchRequest.INITIAL_EVENTS_MISSING_ONLY
        if initial not in MultiWatchRequest.InitialEvents.values():
            raise InvalidFanoutRequestError(f"initial_events {request.initial_events} is not a known value")
        resolution = self._directory.resolve(identity, request.selection)
        points: dict[str, str] = {}
        if request.resume:
            payload = self._sealer.open(RESUME, request.resume, identity.subject, resume_binding(query))
            found = payload.get("r")
            if isinstance(found, dict):
                points.update({str(k): str(v) for k, v in found.items()})
        if len(request.resume_from) > self._directory.max_clusters:
            raise InvalidFanoutRequestError(
                f"resume_from names {len(request.resume_from)} clusters; the limit is "
                f"{self._directory.max_clusters} (fanout.max_clusters_per_call in otterscale.yaml)"
            )
        for entry in request.resume_from:
            if not entry.cluster or len(entry.resource_version) > MAX_RESOURCE_VERSION_CHARS:
                raise InvalidFanoutRequestError(
                    f"resume_from: {echo(entry.cluster)} needs a cluster name and a resourceVersion "
                    f"of at most {MAX_RESOURCE_VERSION_CHARS} characters"
                )
            points[entry.cluster] = entry.resource_version
        stream = _Stream(identity, query, codec, resolution.clusters, concurrency, self._metrics)
        for name, leg in stream.legs.items():
            if initial != MultiWatchRequest.INITIAL_EVENTS_ALL and points.get(name):
                leg.rv = leg.checkpoint_rv = points[name]
        return self._run(
            stream,
            resolution,
            initial=initial,
            leg_timeout=leg_timeout,
            interval=interval or CHECKPOINT_INTERVAL,
            auto_resync=not request.disable_auto_resync,
            expires=expires,
        )

    async def _run(
        self,
        stream: _Stream,
        resolution: Resolution,
        *,
        initial: int,
        leg_timeout: float,
        interval: float,
        auto_resync: bool,
        expires: float | None,
    ) -> AsyncGenerator[bytes, None]:
        identity = stream.identity
        codec = stream.codec
        started = time.monotonic()
        # Taken here, in the generator, so that its ``finally`` always gives them back.
        try:
            self._watch_slots.acquire(identity.subject)
        except WatchLimitError:
            if self._on_refused is not None:
                self._on_refused("watch_limit")
            raise
        try:
            self._subject_legs.acquire(identity.subject, len(stream.legs), watch=True)
        except Exception:
            self._watch_slots.release(identity.subject)
            raise
        self._streams.add(stream)
        self._metrics.watch_streams.inc()
        self._metrics.watch_legs.inc(len(stream.legs))
        for leg in stream.legs.values():
            leg.task = spawn(
                self._leg(
                    stream,
                    leg,
                    initial=initial,
                    leg_timeout=leg_timeout,
                    auto_resync=auto_resync,
                    expires=expires,
                ),
                name=f"multiwatch-leg:{leg.name}",
            )
        ending = "client"
        try:
            for name in resolution.unknown:
                status = ClusterStatus(
                    cluster=name, outcome=Outcome.OUTCOME_UNKNOWN_CLUSTER, message="no such cluster"
                )
                yield wire.encode(MultiWatchResponse(status=status), codec)
            all_synced = False
            next_checkpoint = time.monotonic() + interval
            while True:
                if stream.ending is not None:
                    if stream.ending_checkpoint:
                        yield self._checkpoint(stream)
                    ending = stream.ending.code.value
                    raise stream.ending
                now = time.monotonic()
                if (
                    not all_synced
                    and stream.legs
                    and all(leg.ever_synced or leg.done for leg in stream.legs.values())
                ):
                    all_synced = True
                    next_checkpoint = now
                if now >= next_checkpoint:
                    next_checkpoint = now + interval
                    yield self._checkpoint(stream)
                    continue
                if not stream.ready:
                    if stream.legs and all(leg.done for leg in stream.legs.values()):
                        ending = "ok (every leg ended)"
                        yield self._checkpoint(stream)
                        return
                    stream.wake.clear()
                    try:
                        async with asyncio.timeout(max(0.0, next_checkpoint - now)):
                            await stream.wake.wait()
                    except TimeoutError:
                        pass
                    continue
                leg = stream.ready.popleft()
                leg.deficit += QUANTUM
                first = True
                while leg.queue and (first or len(leg.queue[0].data) <= leg.deficit):
                    first = False
                    item = leg.queue.popleft()
                    size = len(item.data)
                    leg.deficit -= size
                    leg.queued -= size
                    if leg.queued < stream.leg_cap:
                        leg.space.set()
                    if item.checkpoint is _CLEAR:
                        leg.checkpoint_rv = None
                    elif isinstance(item.checkpoint, str):
                        leg.checkpoint_rv = item.checkpoint
                    yield item.data
                if leg.queue:
                    stream.ready.append(leg)
                else:
                    leg.scheduled = False
                    leg.deficit = 0
        finally:
            self._streams.discard(stream)
            self._metrics.watch_streams.dec()
            self._metrics.watch_legs.dec(len(stream.legs))
            await cancel_and_wait([leg.task for leg in stream.legs.values() if leg.task is not None])
            self._subject_legs.release(identity.subject, len(stream.legs), watch=True)
            self._watch_slots.release(identity.subject)
            record(
                "MultiWatch",
                identity,
                resolution,
                {
                    leg.name: AuditClusterOutcome(
                        outcome_name(leg.last_outcome) or "not_attempted",
                        items=leg.events,
                        reconnects=leg.reconnects,
                    )
                    for leg in stream.legs.values()
                }
                | {name: AuditClusterOutcome("unknown_cluster") for name in resolution.unknown},
                query=stream.query.describe(),
                ended=ending,
                seconds=round(time.monotonic() - started, 1),
                resyncs=stream.resyncs,
            )

    def _checkpoint(self, stream: _Stream) -> bytes:
        versions = {name: leg.checkpoint_rv for name, leg in stream.legs.items() if leg.checkpoint_rv}
        token = self._sealer.seal(
            RESUME, stream.identity.subject, resume_binding(stream.query), {"r": versions}
        )
        synced = sum(1 for leg in stream.legs.values() if leg.synced)
        checkpoint = Checkpoint(resume=token, clusters_synced=synced, clusters_total=len(stream.legs))
        return wire.encode(MultiWatchResponse(checkpoint=checkpoint), stream.codec)

    # ----------------------------------------------------------------------------------------------
    # One leg

    async def _leg(
        self,
        stream: _Stream,
        leg: _Leg,
        *,
        initial: int,
        leg_timeout: float,
        auto_resync: bool,
        expires: float | None,
    ) -> None:
        backoff = BACKOFF_FIRST
        announced = False  # UNAVAILABLE was reported for the current outage
        quiet_retry = False  # a broken live leg was retried once without a word
        resyncing = False
        first_connect = True
        while True:
            if not self._directory.allows(stream.identity, leg.name):
                stream.status(
                    leg, Outcome.OUTCOME_REMOVED, "no longer selected for this caller", checkpoint=_CLEAR
                )
                leg.done = True
                stream.wake.set()
                return
            if expires is not None and self._clock() >= expires:
                stream.end(
                    ConnectError(
                        Code.UNAUTHENTICATED,
                        "the caller's token expired; reconnect with a fresh token and resume from the "
                        "last checkpoint",
                    )
                )
                return
            if not self._legs.connected(leg.name):
                if not announced:
                    message = f"the agent of cluster {leg.name!r} is not connected"
                    stream.status(leg, Outcome.OUTCOME_UNAVAILABLE, message, retryable=True)
                    announced = True
                    leg.synced = False
                await self._pause(_jitter(backoff), changes=True)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if first_connect or announced:
                stream.status(leg, Outcome.OUTCOME_CONNECTING)
            if leg.partial_initial:
                # The client got part of this cluster's initial objects: it must drop them first.
                leg.partial_initial = False
                resyncing = True
                stream.status(leg, Outcome.OUTCOME_RESYNC_START, "the initial events broke off; re-listing",
                              checkpoint=_CLEAR)  # fmt: skip
            if not first_connect:
                leg.reconnects += 1
            first_connect = False
            with_initial = resyncing or (not leg.rv and initial != MultiWatchRequest.INITIAL_EVENTS_NONE)
            try:
                if not leg.rv and not with_initial:
                    async with stream.start_window:
                        leg.rv = await self._current_version(stream, leg, leg_timeout)
                    leg.checkpoint_rv = leg.rv
                leg.progress = False
                progressed = await self._watch(stream, leg, with_initial=with_initial, resyncing=resyncing)
                resyncing = False
                if progressed:
                    # The cluster ended a watch that worked (its own timeout): resume at once.
                    backoff = BACKOFF_FIRST
                    announced = quiet_retry = False
                else:  # ended without a single event: do not hammer it
                    await self._pause(_jitter(backoff), changes=False)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            except _Expired:
                stream.resyncs += 1
                if not auto_resync:
                    message = "the cluster's history expired (410); list it again"
                    stream.status(leg, Outcome.OUTCOME_EXPIRED, message, checkpoint=_CLEAR)
                    leg.done = True
                    stream.wake.set()
                    return
                message = "the cluster's history expired (410); re-listing"
                stream.status(leg, Outcome.OUTCOME_RESYNC_START, message, checkpoint=_CLEAR)
                leg.rv, leg.synced, resyncing = "", False, True
                continue
            except LegFailure as failure:
                if leg.progress:  # it had worked again since the last quiet retry
                    quiet_retry = False
                if leg.synced and failure.retryable and not quiet_retry:
                    # A live leg broke (an agent's "watch ended, resume", a cut tunnel): try once
                    # at once and say nothing if that works.
                    quiet_retry = True
                    continue
                leg.synced = False
                if failure.outcome in _PARKED:
                    if leg.last_outcome != failure.outcome:
                        stream.status(leg, failure.outcome, failure.message)
                    announced = True
                    await self._pause(PARKED_RETRY, changes=False)
                    continue
                if not announced or leg.last_outcome != failure.outcome:
                    stream.status(leg, failure.outcome, failure.message, retryable=failure.retryable)
                    announced = True
                await self._pause(_jitter(backoff), changes=failure.outcome == Outcome.OUTCOME_UNAVAILABLE)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _pause(self, seconds: float, *, changes: bool) -> None:
        """Sleep ``seconds``; with ``changes``, wake early when a cluster's connection changes."""
        if not changes:
            await asyncio.sleep(seconds)
            return
        try:
            async with asyncio.timeout(seconds):
                await self._legs.wait_changed()
        except TimeoutError:
            pass

    async def _current_version(self, stream: _Stream, leg: _Leg, within: float) -> str:
        """The cluster's current resourceVersion (a List of one item, as the caller)."""
        request = stream.query.list_request(leg.name, 1, "")
        try:
            data = await self._legs.list(
                leg.name,
                stream.identity,
                RawMessage(wire.encode(request, stream.codec), stream.codec),
                within=within,
                max_bytes=16 * 1024 * 1024,
            )
        except ResponseTooLarge:
            raise LegFailure(Outcome.OUTCOME_ERROR, "one object is larger than 16 MiB") from None
        try:
            return wire.scan_list(data, stream.codec).resource_version
        except wire.WireError:
            raise LegFailure(Outcome.OUTCOME_ERROR, "the agent's answer cannot be read") from None

    async def _watch(self, stream: _Stream, leg: _Leg, *, with_initial: bool, resyncing: bool) -> bool:
        """Run one Watch of ``leg`` until it ends; whether it delivered anything (progress).

        Raises :class:`_Expired` on a 410, :class:`LegFailure` on a refusal or a broken stream.
        """
        codec = stream.codec
        request = stream.query.watch_request(
            leg.name, "" if with_initial else leg.rv, initial_events=with_initial
        )
        loop = asyncio.get_running_loop()
        progressed = False
        in_initial = with_initial
        grace: asyncio.TimerHandle | None = None

        def synced(rv: object) -> None:
            nonlocal grace
            if grace is not None:
                grace.cancel()
                grace = None
            if not leg.synced:
                leg.synced = leg.ever_synced = True
                outcome = Outcome.OUTCOME_RESYNC_END if resyncing else Outcome.OUTCOME_SYNCED
                stream.status(leg, outcome, checkpoint=rv)

        window = stream.start_window
        await window.acquire()
        holding = True
        try:
            async with self._legs.watch(
                leg.name, stream.identity, RawMessage(wire.encode(request, codec), codec)
            ) as events:
                if not with_initial:
                    grace = loop.call_later(SYNC_GRACE, synced, _KEEP)
                    window.release()
                    holding = False
                async for data in events:
                    try:
                        meta = wire.scan_event(data, codec)
                    except wire.WireError as exc:
                        logger.warning("cluster %s: an agent's Watch event cannot be read: %s", leg.name, exc)
                        raise LegFailure(
                            Outcome.OUTCOME_ERROR, "the agent sent an event that cannot be read"
                        ) from None
                    if meta.type == wire.TYPE_ERROR:
                        if meta.status_code == 410:
                            raise _Expired()
                        raise LegFailure(
                            Outcome.OUTCOME_ERROR, short(meta.status_message or "the watch failed")
                        )
                    progressed = leg.progress = True
                    if in_initial:
                        if meta.type == wire.TYPE_BOOKMARK and wire.initial_events_end(data, codec):
                            in_initial = False
                            leg.rv = meta.resource_version
                            stream.event(leg, data, _KEEP)
                            synced(meta.resource_version)
                            if holding:
                                window.release()
                                holding = False
                        else:
                            stream.event(leg, data, _KEEP)
                    else:
                        if not leg.synced:
                            synced(_KEEP)
                        if meta.resource_version:
                            leg.rv = meta.resource_version
                        stream.event(leg, data, meta.resource_version or _KEEP)
                    await stream.room(leg)
        finally:
            if grace is not None:
                grace.cancel()
            if holding:
                window.release()
            if in_initial:  # broken off before the initial events were complete: start them over
                leg.rv = ""
                leg.partial_initial = leg.partial_initial or progressed
        if in_initial:
            raise LegFailure(
                Outcome.OUTCOME_UNAVAILABLE, "the watch ended during the initial events; retrying"
            )
        return progressed


class _Expired(Exception):
    """The leg's resourceVersion is too old (410)."""


def _jitter(seconds: float) -> float:
    return seconds * random.uniform(0.5, 1.0)  # noqa: S311 - spreading retries, not a secret
