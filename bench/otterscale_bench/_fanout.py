"""Fan-out benchmarks (issue 18): MultiList and MultiWatch through the hub, and the hub alone at scale.

Two fleets, one after the other, each with its own hub (:mod:`._fanout_fleet`). On the real
fleet (real agents, real tunnels, shared control planes):

- *lists*: MultiList of ``list_items`` ConfigMaps x ``list_clusters`` clusters unpaged, against
  B1 (the same Lists issued concurrently through the hub) and B2 (sequentially); then paged
  traversals (``page_limit``) in both orders. Every answer is decoded and its items counted
  (unique (cluster, namespace, name) triples).
- *black hole*: one of those clusters' tunnel frozen; the page's time against its per-cluster
  timeout.
- *watch*: MultiWatch over every cluster at ``watch_rate`` events per second in total, spread
  evenly, write -> client latency; against one single-cluster Watch through the hub at the same
  rate, in the same run.
- *fairness*: ``h00`` written ``hot_rate`` times a second while every other cluster gets one event
  a second: the quiet clusters' latency.

Events per cluster: a write to a shared control plane is seen by every cluster on it, so each
plane's object is written ``r`` times a second to give each of its clusters ``r`` events a
second; the report says writes and events apart.

On the stub fleet (``stub_clusters`` clusters, real chisel clients, one replaying stub agent):
MultiList over all of them, cursor and resume token sizes, what opening and sealing them again
costs (the hub's token code and keys, run in this process), and the hub's memory with one
MultiWatch leg per cluster. Labelled "stub agents" in the report: these rows measure the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.protocol import ProtocolType
from google.protobuf.duration_pb2 import Duration
from pyqwest import Client, HTTPTransport, HTTPVersion, ReadError, RemoteProtocolError, WriteError

from otterscale.common import load_config
from otterscale.hub._fanout import token_keys
from otterscale.hub._fanout.listing import cursor_binding, resume_binding
from otterscale.hub._fanout.query import Query
from otterscale.hub._fanout.tokens import CURSOR, RESUME, TokenSealer
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.multicluster_connect import MultiClusterServiceClient
from otterscale.resource.v1.multicluster_pb2 import (
    ClusterSelection,
    ClusterStatus,
    FanoutOptions,
    MultiListRequest,
    MultiListResponse,
    MultiWatchRequest,
    MultiWatchResponse,
    ResourceQuery,
)
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import (
    ControlPlane,
    LocalIssuer,
)

from ._fanout_fleet import (
    AUDIENCE,
    FANOUT_FULL,
    FANOUT_SMOKE,
    HOLE,
    HOT,
    LIST_NAMESPACE,
    SUBJECT,
    SYNCED,
    WATCH_LABEL,
    WATCH_NAMESPACE,
    FanoutSizes,
    RealFleet,
    StubFleet,
    hot_names,
    start_real_fleet,
    start_stub_fleet,
    stop_real_fleet,
    stop_stub_fleet,
)
from ._kube import KubeDirect, KubeError
from ._procs import RSSSampler
from ._stats import median, summary

logger = logging.getLogger(__name__)

__all__ = ["FANOUT_FULL", "FANOUT_SMOKE", "FanoutSizes", "run"]


class Failures:
    """Functional failures found by the fan-out rows (the run exits non-zero on any)."""

    def __init__(self, sink: list[str]) -> None:
        self.sink = sink

    def fail(self, what: str, detail: BaseException | str) -> None:
        text = detail if isinstance(detail, str) else f"{type(detail).__name__}: {detail}"
        message = f"fanout {what}: {text}"[:500]
        logger.error("FUNCTIONAL FAILURE %s", message)
        self.sink.append(message)


# --------------------------------------------------------------------------------------------------
# Clients


@dataclass
class HubClients:
    """A MultiClusterService and a ResourceService client of one hub, binary codec over h2c."""

    url: str
    token: str
    _transports: list[HTTPTransport] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.headers = {"authorization": f"Bearer {self.token}"}
        self.multi = self._client(MultiClusterServiceClient)
        self.resources = self._client(ResourceServiceClient)

    def _client(self, kind: Any) -> Any:
        transport = HTTPTransport(http_version=HTTPVersion.HTTP2, enable_gzip=False)
        self._transports.append(transport)
        return kind(
            self.url,
            protocol=ProtocolType.CONNECT,
            codec=google_protobuf_binary_codec(),
            http_client=Client(transport),
            accept_compression=(),
            send_compression=None,
            read_max_bytes=512 * 1024 * 1024,
            timeout_ms=600_000,
        )

    async def aclose(self) -> None:
        await self.multi.close()
        await self.resources.close()
        for transport in self._transports:
            await transport.aclose()


def list_request(
    clusters: Sequence[str], *, limit: int, order: int = 0, timeout: float | None = None, concurrency: int = 0
) -> MultiListRequest:
    options = FanoutOptions(max_concurrency=concurrency)
    if timeout is not None:
        options.per_cluster_timeout.CopyFrom(Duration(seconds=int(timeout), nanos=int(timeout % 1 * 1e9)))
    return MultiListRequest(
        selection=ClusterSelection(clusters=list(clusters)),
        query=ResourceQuery(version="v1", resource="configmaps", namespace=LIST_NAMESPACE),
        limit=limit,
        order=order,  # type: ignore[arg-type]
        options=options,
    )


def page_items(page: MultiListResponse) -> Counter[tuple[str, str]]:
    """(cluster, name) of every item of a page (decoded, as a client would)."""
    found: Counter[tuple[str, str]] = Counter()
    for part in page.lists:
        for item in part.list.items:
            found[
                (part.cluster, item.object.fields["metadata"].struct_value.fields["name"].string_value)
            ] += 1
    return found


async def traverse(
    clients: HubClients, first: MultiListRequest
) -> tuple[Counter[tuple[str, str]], list[MultiListResponse]]:
    request = MultiListRequest()
    request.CopyFrom(first)
    found: Counter[tuple[str, str]] = Counter()
    pages = []
    for _ in range(100_000):
        page = await clients.multi.multi_list(request, headers=clients.headers)
        found.update(page_items(page))
        pages.append(page)
        if not page.next_cursor:
            return found, pages
        request.cursor = page.next_cursor
    raise RuntimeError("the traversal did not end")


# --------------------------------------------------------------------------------------------------
# MultiList


async def _b1(clients: HubClients, clusters: Sequence[str], expected: int) -> float:
    started = time.perf_counter()
    answers = await asyncio.gather(
        *(clients.resources.list(_single(c), headers=clients.headers) for c in clusters)
    )
    elapsed = (time.perf_counter() - started) * 1000
    if sum(len(a.items) for a in answers) != expected:
        raise RuntimeError("B1 returned the wrong number of items")
    return elapsed


async def _b2(clients: HubClients, clusters: Sequence[str], expected: int) -> float:
    started = time.perf_counter()
    count = 0
    for cluster in clusters:
        count += len((await clients.resources.list(_single(cluster), headers=clients.headers)).items)
    elapsed = (time.perf_counter() - started) * 1000
    if count != expected:
        raise RuntimeError("B2 returned the wrong number of items")
    return elapsed


def _single(cluster: str) -> pb.ListRequest:
    return pb.ListRequest(cluster=cluster, version="v1", resource="configmaps", namespace=LIST_NAMESPACE)


async def lists(
    fleet: RealFleet, clients: HubClients, sizes: FanoutSizes, failures: Failures
) -> dict[str, Any]:
    clusters = sorted(fleet.placement)[: sizes.list_clusters]
    expected = len(clusters) * sizes.list_items
    # One page: every item, and at least MIN_LEG_ITEMS (100) a cluster so every cluster takes part.
    unpaged = list_request(clusters, limit=max(expected, 100 * len(clusters)))
    result: dict[str, Any] = {
        "clusters": len(clusters),
        "items_per_cluster": sizes.list_items,
        "expected_items": expected,
    }

    async def multi() -> tuple[float, int]:
        started = time.perf_counter()
        found, pages = await traverse(clients, unpaged)
        elapsed = (time.perf_counter() - started) * 1000
        if len(pages) != 1 or len(found) != expected or max(found.values()) != 1:
            raise RuntimeError(
                f"unpaged MultiList: {len(pages)} pages, {len(found)} unique items of {expected}"
            )
        return elapsed, pages[0].ByteSize()

    try:
        await multi()
        await _b1(clients, clusters, expected)
        await _b2(clients, clusters, expected)
        hub = ["hub"]
        fleet.procs.reset_peak(hub)
        baseline = fleet.procs.rss(hub)["hub"]
        cpu_before = fleet.procs.cpu()
        with RSSSampler(fleet.procs, hub, interval=0.02) as sampler:
            runs = [await multi() for _ in range(sizes.list_repeats)]
        cpu_after = fleet.procs.cpu()
        peak = fleet.procs.peak(hub, sampler.maximum())["hub"]
        fleet.procs.reset_peak(hub)
        b1_baseline = fleet.procs.rss(hub)["hub"]
        b1_before = fleet.procs.cpu()
        with RSSSampler(fleet.procs, hub, interval=0.02) as b1_sampler:
            b1 = [await _b1(clients, clusters, expected) for _ in range(sizes.list_repeats)]
        b1_cpu = fleet.procs.cpu().seconds["hub"] - b1_before.seconds["hub"]
        b1_peak = fleet.procs.peak(hub, b1_sampler.maximum())["hub"]
        b2 = [await _b2(clients, clusters, expected) for _ in range(max(2, sizes.list_repeats // 3))]
    except Exception as exc:
        failures.fail("MultiList unpaged", exc)
        return result
    multi_ms = [ms for ms, _ in runs]
    hub_cpu = cpu_after.seconds["hub"] - cpu_before.seconds["hub"]
    response_bytes = runs[-1][1]
    result.update(
        {
            "multilist_ms": {k: round(v, 1) for k, v in summary(multi_ms).items()},
            "b1_concurrent_ms": {k: round(v, 1) for k, v in summary(b1).items()},
            "b2_sequential_ms": {k: round(v, 1) for k, v in summary(b2).items()},
            "response_bytes": response_bytes,
            "hub_cpu_us_per_item": round(hub_cpu / (len(runs) * expected) * 1e6, 2),
            "b1_hub_cpu_us_per_item": round(b1_cpu / (len(b1) * expected) * 1e6, 2),
            "hub_rss_mib_baseline": round(baseline, 1),
            "hub_rss_mib_peak": round(peak, 1),
            "hub_rss_increase_over_response": round((peak - baseline) * 1024 * 1024 / response_bytes, 2),
            "b1_hub_rss_increase_over_response": round(
                (b1_peak - b1_baseline) * 1024 * 1024 / response_bytes, 2
            ),
        }
    )
    for name, order in (
        ("fair", MultiListRequest.ORDER_FAIR),
        ("cluster_major", MultiListRequest.ORDER_CLUSTER_MAJOR),
    ):
        try:
            started = time.perf_counter()
            found, pages = await traverse(
                clients, list_request(clusters, limit=sizes.page_limit, order=order)
            )
            elapsed = (time.perf_counter() - started) * 1000
        except Exception as exc:
            failures.fail(f"MultiList paged {name}", exc)
            continue
        if len(found) != expected or max(found.values()) != 1:
            failures.fail(
                f"MultiList paged {name}",
                f"{len(found)} unique items of {expected}, most {max(found.values())}x",
            )
        result[f"paged_{name}"] = {
            "limit": sizes.page_limit,
            "pages": len(pages),
            "ms": round(elapsed, 1),
            "x_unpaged": round(elapsed / median(multi_ms), 2),
            "cursor_bytes_max": max(len(p.next_cursor) for p in pages),
            "resume_bytes": len(pages[-1].resume),
        }
    logger.info(
        "fanout lists: MultiList p50 %.0f ms, B1 p50 %.0f ms, B2 p50 %.0f ms",
        result["multilist_ms"]["p50"],
        result["b1_concurrent_ms"]["p50"],
        result["b2_sequential_ms"]["p50"],
    )
    return result


async def black_hole(
    fleet: RealFleet, clients: HubClients, sizes: FanoutSizes, failures: Failures
) -> dict[str, Any]:
    clusters = sorted(fleet.placement)[: sizes.list_clusters]
    assert fleet.relay is not None
    assert HOLE in clusters
    request = list_request(
        clusters, limit=max(len(clusters) * sizes.list_items, 100 * len(clusters)), timeout=sizes.hole_timeout
    )
    small = list_request(clusters, limit=100 * len(clusters), timeout=sizes.hole_timeout)
    frozen = fleet.relay.freeze()
    try:
        # A page of 100 items a cluster first (its time is the timeout plus the call), then the
        # unpaged page (plus moving and decoding the other clusters' 1,000 items each).
        started = time.perf_counter()
        await clients.multi.multi_list(small, headers=clients.headers)
        small_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        page = await clients.multi.multi_list(request, headers=clients.headers)
        elapsed = (time.perf_counter() - started) * 1000
    except Exception as exc:
        failures.fail("black hole", exc)
        return {}
    finally:
        fleet.relay.thaw()
    outcomes = {s.cluster: ClusterStatus.Outcome.Name(s.outcome) for s in page.statuses}
    others_ok = all(outcomes[c] == "OUTCOME_OK" for c in clusters if c != HOLE)
    if not others_ok or outcomes.get(HOLE) not in ("OUTCOME_TIMEOUT", "OUTCOME_UNAVAILABLE"):
        failures.fail("black hole", f"outcomes {outcomes}")
    await asyncio.to_thread(fleet.system.wait_connected, HOLE, True, 120)
    return {
        "clusters": len(clusters),
        "frozen_connections": frozen,
        "per_cluster_timeout_ms": sizes.hole_timeout * 1000,
        "page_ms": round(elapsed, 1),
        "over_timeout_ms": round(elapsed - sizes.hole_timeout * 1000, 1),
        "small_page_ms": round(small_ms, 1),
        "small_page_over_timeout_ms": round(small_ms - sizes.hole_timeout * 1000, 1),
        "hole_outcome": outcomes.get(HOLE),
        "others_ok": others_ok,
    }


# --------------------------------------------------------------------------------------------------
# Watch


@dataclass
class _Arrivals:
    """Write timestamps seen per cluster: (cluster, write ns) -> arrival ns."""

    seen: dict[tuple[str, int], int] = field(default_factory=dict)
    synced: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False  # the benchmark ends the stream itself: its end is no error
    events: int = 0  # every event received


def _stamp(event: pb.WatchEvent) -> int | None:
    data = event.resource.object.fields["data"].struct_value.fields
    value = data["ts"].string_value if "ts" in data else ""
    return int(value) if value.isdigit() and value != "0" else None


async def _read_multi(stream: AsyncIterator[MultiWatchResponse], arrivals: _Arrivals) -> None:
    try:
        async for message in stream:
            now = time.time_ns()
            if message.HasField("event"):
                arrivals.events += 1
                event = message.event.event
                if event.type == pb.WatchEvent.TYPE_MODIFIED:
                    stamp = _stamp(event)
                    if stamp is not None:
                        arrivals.seen[(message.event.cluster, stamp)] = now
                        arrivals.changed.set()
            elif message.HasField("status"):
                if message.status.outcome == SYNCED:
                    arrivals.synced.add(message.status.cluster)
                    arrivals.changed.set()
                elif message.status.outcome not in (ClusterStatus.OUTCOME_CONNECTING,):
                    arrivals.errors.append(
                        f"{message.status.cluster}: {ClusterStatus.Outcome.Name(message.status.outcome)}"
                    )
    except Exception as exc:
        if not arrivals.closing:
            arrivals.errors.append(f"stream: {type(exc).__name__}: {exc}")


async def _read_single(stream: AsyncIterator[pb.WatchEvent], cluster: str, arrivals: _Arrivals) -> None:
    try:
        async for event in stream:
            now = time.time_ns()
            if event.type == pb.WatchEvent.TYPE_ADDED:
                arrivals.synced.add(cluster)
                arrivals.changed.set()
            elif event.type == pb.WatchEvent.TYPE_MODIFIED:
                stamp = _stamp(event)
                if stamp is not None:
                    arrivals.seen[(cluster, stamp)] = now
                    arrivals.changed.set()
    except Exception as exc:
        if not arrivals.closing:
            arrivals.errors.append(f"stream: {type(exc).__name__}: {exc}")


async def _writer(
    kube: KubeDirect, names: Sequence[str], rate: float, seconds: float, writes: list[tuple[int, str]]
) -> int:
    """Change ``names`` round-robin at ``rate`` per second for ``seconds``; returns writes skipped
    because kube-apiserver fell 256 writes behind (counted, never queued without bound)."""
    if rate <= 0:
        return 0
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    skipped = 0

    async def one(name: str) -> None:
        stamp = time.time_ns()
        try:
            await kube.request(
                "PATCH",
                f"/api/v1/namespaces/{WATCH_NAMESPACE}/configmaps/{name}",
                {"data": {"ts": str(stamp)}},
                content_type="application/merge-patch+json",
            )
        except (KubeError, OSError, ReadError, WriteError, RemoteProtocolError):
            return  # not written (refused, or the connection failed under load): nothing to expect
        writes.append((stamp, name))
        ACKS[stamp] = time.time_ns()

    start = loop.time()
    for k in range(int(seconds * rate)):
        delay = start + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(pending) >= 256:
            skipped += 1
            continue
        task = asyncio.create_task(one(names[k % len(names)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    # Writes still unanswered then are abandoned (never counted), not left running after us.
    for task in list(pending):
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return skipped


async def _settle(arrivals: _Arrivals, expected: set[tuple[str, int]], within: float) -> None:
    """Until every expected (cluster, write) arrived, or ``within`` seconds (then some are missing)."""
    deadline = time.monotonic() + within
    while not expected.issubset(arrivals.seen):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        arrivals.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(left, 1.0)):
                await arrivals.changed.wait()


def _latencies(arrivals: _Arrivals, expected: set[tuple[str, int]]) -> list[float]:
    """Write (the moment the PATCH was sent) -> client, ms."""
    return [(arrivals.seen[key] - key[1]) / 1e6 for key in expected if key in arrivals.seen]


def _after_ack(arrivals: _Arrivals, expected: set[tuple[str, int]]) -> list[float]:
    """kube-apiserver's acknowledgement of the write -> client, ms: the path's own latency, without
    the write's time in a kube-apiserver and etcd that a loaded machine slows down."""
    return [
        (arrivals.seen[key] - ACKS[key[1]]) / 1e6
        for key in expected
        if key in arrivals.seen and key[1] in ACKS
    ]


#: Write timestamp (ns) -> when kube-apiserver acknowledged it (ns).
ACKS: dict[int, int] = {}


@contextlib.asynccontextmanager
async def _multiwatch(
    clients: HubClients, clusters: Sequence[str], arrivals: _Arrivals
) -> AsyncIterator[None]:
    request = MultiWatchRequest(
        selection=ClusterSelection(clusters=list(clusters)),
        query=ResourceQuery(
            version="v1", resource="configmaps", namespace=WATCH_NAMESPACE, label_selector=WATCH_LABEL
        ),
        initial_events=MultiWatchRequest.INITIAL_EVENTS_MISSING_ONLY,
    )
    stream = clients.multi.multi_watch(request, headers=clients.headers)
    task = asyncio.create_task(_read_multi(stream, arrivals), name="bench-fanout-multiwatch")
    try:
        yield
    finally:
        arrivals.closing = True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def _until_synced(arrivals: _Arrivals, clusters: Sequence[str], within: float = 300.0) -> None:
    deadline = time.monotonic() + within
    while not set(clusters) <= arrivals.synced:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(set(clusters) - arrivals.synced)} legs not SYNCED within {within:g}s")
        arrivals.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await arrivals.changed.wait()


def _expected(writes: dict[int, list[tuple[int, str]]], fleet: RealFleet) -> set[tuple[str, int]]:
    """Every (cluster, write): a write to a plane's object reaches every cluster on that plane."""
    return {
        (cluster, stamp)
        for plane, done in writes.items()
        for stamp, _ in done
        for cluster in fleet.clusters_on(plane)
    }


async def _every_plane(
    fleet: RealFleet, per_cluster: float, seconds: float, writes: dict[int, list[tuple[int, str]]]
) -> None:
    """Write one object of every plane ``per_cluster`` times a second (each of its clusters sees it)."""
    jobs = []
    for index, kube in enumerate(fleet.kubes):
        if fleet.clusters_on(index):
            writes[index] = []
            names = ["hot-000"] if index == 0 else ["fw"]
            jobs.append(_writer(kube, names, per_cluster, seconds, writes[index]))
    await asyncio.gather(*jobs)


async def separate_watches(
    fleet: RealFleet, clients: HubClients, sizes: FanoutSizes, failures: Failures
) -> dict[str, Any]:
    """The MultiWatch row's other baseline: the same clusters as one single-cluster Watch each
    through the hub, the same writes (as B1 is for MultiList)."""
    clusters = sorted(fleet.placement)
    per_cluster = sizes.watch_rate / len(clusters)
    arrivals = _Arrivals()
    writes: dict[int, list[tuple[int, str]]] = {}
    tasks = []
    try:
        for cluster in clusters:
            request = pb.WatchRequest(
                cluster=cluster,
                version="v1",
                resource="configmaps",
                namespace=WATCH_NAMESPACE,
                label_selector=WATCH_LABEL,
            )
            stream = clients.resources.watch(request, headers=clients.headers)
            tasks.append(
                asyncio.create_task(_read_single(stream, cluster, arrivals), name=f"bench-watch-{cluster}")
            )
        await _until_synced(arrivals, clusters)
        await _every_plane(fleet, per_cluster, sizes.watch_seconds, writes)
        expected = _expected(writes, fleet)
        await _settle(arrivals, expected, 15)
    except Exception as exc:
        failures.fail("separate Watches", exc)
        return {}
    finally:
        arrivals.closing = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    delivered = _latencies(arrivals, expected)
    return {
        "streams": len(clusters),
        "events": len(expected),
        "missing": len(expected) - len(delivered),
        "delivery_ms": {k: round(v, 2) for k, v in summary(delivered).items()},
        "delivery_after_ack_ms": {k: round(v, 2) for k, v in summary(_after_ack(arrivals, expected)).items()},
    }


async def watch(
    fleet: RealFleet, clients: HubClients, sizes: FanoutSizes, failures: Failures
) -> dict[str, Any]:
    """MultiWatch over every cluster at ``watch_rate`` events/s in total vs one single-cluster Watch."""
    clusters = sorted(fleet.placement)
    per_cluster = sizes.watch_rate / len(clusters)  # events per second each cluster gets
    result: dict[str, Any] = {"clusters": len(clusters), "events_per_second": sizes.watch_rate}
    arrivals = _Arrivals()
    writes: dict[int, list[tuple[int, str]]] = {}
    try:
        async with _multiwatch(clients, clusters, arrivals):
            started = time.monotonic()
            await _until_synced(arrivals, clusters)
            result["all_synced_s"] = round(time.monotonic() - started, 2)
            cpu_before = fleet.procs.cpu()
            await _every_plane(fleet, per_cluster, sizes.watch_seconds, writes)
            cpu_after = fleet.procs.cpu()
            expected = _expected(writes, fleet)
            await _settle(arrivals, expected, 15)
    except Exception as exc:
        failures.fail("MultiWatch", exc)
        return result
    delivered = _latencies(arrivals, expected)
    after_ack = _after_ack(arrivals, expected)
    missing = len(expected) - len(delivered)
    if missing > len(expected) // 100:
        failures.fail("MultiWatch", f"{missing} of {len(expected)} events never arrived")
    if arrivals.errors:
        failures.fail("MultiWatch", f"leg problems: {arrivals.errors[:5]}")
    result.update(
        {
            "writes_per_second": round(per_cluster * len(writes), 2),
            "events": len(expected),
            "missing": missing,
            "delivery_ms": {k: round(v, 2) for k, v in summary(delivered).items()},
            "delivery_after_ack_ms": {k: round(v, 2) for k, v in summary(after_ack).items()},
            "hub_cpu_ms_per_event": round(
                (cpu_after.seconds["hub"] - cpu_before.seconds["hub"]) * 1000 / max(1, len(delivered)), 3
            ),
            "hub_rss_mib": round(fleet.procs.rss(["hub"])["hub"], 1),
        }
    )
    # The baseline: one single-cluster Watch through the hub, h00's control plane written as often as
    # all planes together were above (the same load on kube-apiserver and etcd).
    baseline_rate = per_cluster * len(writes)
    single = _Arrivals()
    request = pb.WatchRequest(
        cluster=HOT,
        version="v1",
        resource="configmaps",
        namespace=WATCH_NAMESPACE,
        label_selector=WATCH_LABEL,
    )
    stream = clients.resources.watch(request, headers=clients.headers)
    task = asyncio.create_task(_read_single(stream, HOT, single), name="bench-fanout-single-watch")
    done: list[tuple[int, str]] = []
    try:
        await _until_synced(single, [HOT])
        await _writer(fleet.kubes[0], hot_names(), baseline_rate, sizes.watch_seconds, done)
        single_expected = {(HOT, stamp) for stamp, _ in done}
        await _settle(single, single_expected, 15)
    except Exception as exc:
        failures.fail("single-cluster Watch", exc)
        return result
    finally:
        single.closing = True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    baseline = _latencies(single, single_expected)
    result["single_watch"] = {
        "writes_per_second": round(baseline_rate, 2),
        "events": len(single_expected),
        "missing": len(single_expected) - len(baseline),
        "delivery_ms": {k: round(v, 2) for k, v in summary(baseline).items()},
        "delivery_after_ack_ms": {
            k: round(v, 2) for k, v in summary(_after_ack(single, single_expected)).items()
        },
    }
    logger.info(
        "fanout watch: MultiWatch p50 %.1f p99 %.1f ms; single Watch p50 %.1f p99 %.1f ms",
        result["delivery_ms"]["p50"],
        result["delivery_ms"]["p99"],
        result["single_watch"]["delivery_ms"]["p50"],
        result["single_watch"]["delivery_ms"]["p99"],
    )
    return result


async def fairness(
    fleet: RealFleet, clients: HubClients, sizes: FanoutSizes, failures: Failures
) -> dict[str, Any]:
    """h00 written ``hot_rate`` times a second; every other cluster one event a second."""
    clusters = sorted(fleet.placement)
    arrivals = _Arrivals()
    result: dict[str, Any] = {
        "clusters": len(clusters),
        "hot_rate": sizes.hot_rate,
        "quiet_rate": sizes.quiet_rate,
    }
    try:
        async with _multiwatch(clients, clusters, arrivals):
            await _until_synced(arrivals, clusters)
            hot: list[tuple[int, str]] = []
            quiet: dict[int, list[tuple[int, str]]] = {}
            jobs = [
                _writer(
                    fleet.kubes[0],
                    hot_names(),
                    sizes.hot_rate,
                    sizes.fair_seconds,
                    hot,
                )
            ]
            for index in range(1, len(fleet.kubes)):
                quiet[index] = []
                jobs.append(
                    _writer(fleet.kubes[index], ["fw"], sizes.quiet_rate, sizes.fair_seconds, quiet[index])
                )
            started = time.monotonic()
            skipped = await asyncio.gather(*jobs)
            elapsed = time.monotonic() - started
            expected_quiet = _expected(quiet, fleet)
            expected_hot = {(HOT, stamp) for stamp, _ in hot}
            await _settle(arrivals, expected_quiet | expected_hot, 30)
    except Exception as exc:
        failures.fail("fairness", exc)
        return result
    quiet_ms = _latencies(arrivals, expected_quiet)
    quiet_after_ack = _after_ack(arrivals, expected_quiet)
    hot_ms = _latencies(arrivals, expected_hot)
    result.update(
        {
            "hot_writes_per_second_achieved": round(len(hot) / elapsed, 1),
            "hot_writes_skipped": skipped[0],
            "quiet_events": len(expected_quiet),
            "quiet_missing": len(expected_quiet) - len(quiet_ms),
            "quiet_delivery_ms": {k: round(v, 2) for k, v in summary(quiet_ms).items()},
            "quiet_delivery_after_ack_ms": {k: round(v, 2) for k, v in summary(quiet_after_ack).items()},
            "hot_delivery_ms": {k: round(v, 2) for k, v in summary(hot_ms).items()},
        }
    )
    if result["quiet_missing"] > max(1, len(expected_quiet) // 100):
        failures.fail("fairness", f"{result['quiet_missing']} quiet events never arrived")
    logger.info(
        "fanout fairness: hot %.0f writes/s; quiet p50 %.1f p99 %.1f ms",
        result["hot_writes_per_second_achieved"],
        result["quiet_delivery_ms"]["p50"],
        result["quiet_delivery_ms"]["p99"],
    )
    return result


async def stub_rows(
    fleet: StubFleet, clients: HubClients, sizes: FanoutSizes, failures: Failures
) -> dict[str, Any]:
    n = sizes.stub_clusters
    names = sorted(fleet.system.clusters)
    result: dict[str, Any] = {
        "clusters": n,
        "items_per_cluster": sizes.stub_items,
        "agents": "stub (replaying)",
    }
    result["idle_rss_mib"] = {k: round(v, 1) for k, v in fleet.procs.rss(["hub", "chisel-server"]).items()}
    expected = n * sizes.stub_items
    # One page for every cluster: enough items a page for a leg of MIN_LEG_ITEMS each, every
    # cluster in flight at once (the stub hub allows max_concurrency up to the fleet's size).
    one_page = list_request(names, limit=100 * n, concurrency=n)
    try:
        await traverse(clients, one_page)  # warm-up: connections
        times = []
        for _ in range(3):
            started = time.perf_counter()
            found, pages = await traverse(clients, one_page)
            times.append((time.perf_counter() - started) * 1000)
            if len(pages) != 1 or len(found) != expected:
                raise RuntimeError(f"{len(pages)} pages, {len(found)} items of {expected}")
        result["multilist_ms"] = {k: round(v, 1) for k, v in summary(times).items()}
        started = time.perf_counter()
        found, pages = await traverse(clients, list_request(names, limit=expected))
        result["default_options"] = {
            "ms": round((time.perf_counter() - started) * 1000, 1),
            "pages": len(pages),
            "items": len(found),
        }
        found, pages = await traverse(clients, list_request(names, limit=sizes.page_limit))
        if len(found) != expected or max(found.values()) != 1:
            raise RuntimeError(f"paged: {len(found)} unique items of {expected}")
        result["paged"] = {
            "limit": sizes.page_limit,
            "pages": len(pages),
            "cursor_bytes_max": max(len(p.next_cursor) for p in pages),
            "resume_bytes": len(pages[-1].resume),
        }
        largest = max((p.next_cursor for p in pages), key=len)
        result["token_costs"] = token_costs(
            fleet.system.config_path, list_request(names, limit=sizes.page_limit), largest, pages[-1].resume
        )
    except Exception as exc:
        failures.fail("stub MultiList", exc)
    # One MultiWatch with a leg per cluster: the hub's memory.
    arrivals = _Arrivals()
    request = MultiWatchRequest(
        selection=ClusterSelection(clusters=names),
        query=ResourceQuery(version="v1", resource="configmaps", namespace=LIST_NAMESPACE),
        initial_events=MultiWatchRequest.INITIAL_EVENTS_NONE,
    )
    hub = ["hub", "chisel-server"]
    stream = clients.multi.multi_watch(request, headers=clients.headers)
    task = asyncio.create_task(_read_multi(stream, arrivals), name="bench-fanout-stub-watch")
    try:
        before = fleet.procs.rss(hub)
        fleet.procs.reset_peak(hub)
        started = time.monotonic()
        with RSSSampler(fleet.procs, hub, interval=0.2) as sampler:
            await _until_synced(arrivals, names, within=600)
            synced = time.monotonic() - started
            await asyncio.sleep(sizes.stub_hold_seconds)  # the legs stay open, events trickle in
        peak = fleet.procs.peak(hub, sampler.maximum())
        now = fleet.procs.rss(hub)
        result["watch"] = {
            "legs": n,
            "all_synced_s": round(synced, 1),
            "events_received": arrivals.events,
            "rss_mib_before": {k: round(v, 1) for k, v in before.items()},
            "rss_mib_open": {k: round(v, 1) for k, v in now.items()},
            "rss_mib_peak": {k: round(v, 1) for k, v in peak.items()},
        }
        if arrivals.errors:
            failures.fail("stub MultiWatch", f"leg problems: {arrivals.errors[:5]}")
    except Exception as exc:
        failures.fail("stub MultiWatch", exc)
    finally:
        arrivals.closing = True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    return result


def token_costs(
    config_path: Path, request: MultiListRequest, cursor: str, resume: str, *, rounds: int = 200
) -> dict[str, Any]:
    """What the hub pays per page for its tokens: the traversal's largest cursor and its resume
    token opened and sealed again ``rounds`` times, with the hub's own code and the keys it
    derives from the shared configuration (ms per open + seal, in this process)."""
    config = load_config(config_path)
    sealer = TokenSealer(*token_keys(config))
    subject = config.keycloak.subject_prefix + SUBJECT
    query = Query.from_message(request.query)
    order = request.order or MultiListRequest.ORDER_FAIR
    tokens = (
        ("cursor", CURSOR, cursor, cursor_binding(request.selection, query, order)),
        ("resume", RESUME, resume, resume_binding(query)),
    )
    result: dict[str, Any] = {}
    for name, kind, token, binding in tokens:
        payload = sealer.open(kind, token, subject, binding)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            sealer.open(kind, sealer.seal(kind, subject, binding, payload), subject, binding)
            times.append((time.perf_counter() - started) * 1000)
        costs = {k: round(v, 3) for k, v in summary(times).items()}
        result[name] = {"bytes": len(token), "open_seal_ms": costs}
    return result


# --------------------------------------------------------------------------------------------------
# Everything


async def run(
    work: Path,
    first_plane: ControlPlane,
    issuer: LocalIssuer,
    sizes: FanoutSizes,
    log_level: str,
    sink: list[str],
    results: dict[str, Any],
) -> None:
    """Every fan-out row, into ``results`` as they finish (a failure keeps what was measured
    before it; functional failures go to ``sink``)."""
    failures = Failures(sink)
    results["sizes"] = sizes.__dict__
    token = issuer.token(SUBJECT, (SUBJECT,), audience=AUDIENCE, lifetime=24 * 3600)
    started = time.monotonic()
    real = await start_real_fleet(work / "real", first_plane, issuer, sizes, log_level)
    results["real_fleet_start_s"] = round(time.monotonic() - started, 1)
    clients = HubClients(real.system.hub_url, token)
    try:
        results["lists"] = await lists(real, clients, sizes, failures)
        results["black_hole"] = await black_hole(real, clients, sizes, failures)
        results["watch"] = await watch(real, clients, sizes, failures)
        results["watch"]["separate_watches"] = await separate_watches(real, clients, sizes, failures)
        results["fairness"] = await fairness(real, clients, sizes, failures)
        recorded = await clients.resources.list(
            pb.ListRequest(
                cluster=HOT,
                version="v1",
                resource="configmaps",
                namespace=LIST_NAMESPACE,
                limit=sizes.stub_items,
            ),
            headers=clients.headers,
        )
        setattr(recorded, "continue", "")
        recorded.remaining_item_count = 0
        items = recorded.SerializeToString()
    finally:
        await clients.aclose()
        await stop_real_fleet(real)
    started = time.monotonic()
    # On the main thread: its processes die with the thread that spawned them (otterscale.testing).
    try:
        stub = start_stub_fleet(work / "stub", issuer, sizes, items, log_level)
    except Exception as exc:
        failures.fail("stub fleet", exc)
        return
    results["stub_fleet_start_s"] = round(time.monotonic() - started, 1)
    clients = HubClients(stub.system.hub_url, token)
    try:
        results["stub"] = await stub_rows(stub, clients, sizes, failures)
    finally:
        await clients.aclose()
        stop_stub_fleet(stub)
