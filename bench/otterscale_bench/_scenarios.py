"""The measurements: idle cost, unary latency, throughput, big lists and Watch fan-in.

Each scenario takes the running :class:`Bench` and returns a JSON-ready dict. A functional
failure (an error answer, a wrong object or item count, a lost Watch event) is recorded in
``bench.failures`` and the scenario goes on where it can; the run exits non-zero if any was
recorded. Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane, System

from . import _profile
from ._kube import KubeDirect, KubeError
from ._paths import WATCH_METHOD, Call, Endpoints, RawList, Variant, make_get, rpc_client, timed
from ._procs import CPUSnapshot, ProcessSet, RSSSampler
from ._stats import median, summary

logger = logging.getLogger(__name__)

#: Processes whose cost is reported, in the order of the request path.
#: A service inside Envoy is ``hub``/``agent`` (the Envoy process) plus its launcher (the command);
#: a service that serves itself has no launcher (it reads as zero).
HUB_SIDE = ("hub", "hub-launcher", "chisel-server")
AGENT_SIDE = ("agent", "agent-launcher", "chisel-client")
CLUSTER_SIDE = ("kube-apiserver", "etcd")
CLIENT = "bench-client"

NAMESPACE = "otterscale-bench"
SMALL_OBJECT = "small"
WATCH_NAMESPACE = "otterscale-bench-watch"


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run does (``FULL`` by default, ``SMOKE`` for CI)."""

    latency_warmup: int
    latency_requests: int
    throughput_concurrency: tuple[int, ...]
    throughput_warmup: float
    throughput_seconds: float
    list_sizes: tuple[int, ...]
    list_repeats: int
    watch_streams: int
    watch_rate: float
    watch_seconds: float
    watch_hold_seconds: float
    watch_batch: int
    watch_streams_per_connection: int
    idle_clusters: int
    idle_connected: int
    idle_settle: float
    idle_seconds: float
    profile: bool
    profile_seconds: float
    startup_repeats: int


FULL = Sizes(
    latency_warmup=200,
    latency_requests=2000,
    throughput_concurrency=(1, 16, 64),
    throughput_warmup=1.5,
    throughput_seconds=8.0,
    list_sizes=(1000, 5000),
    list_repeats=5,
    watch_streams=1000,
    watch_rate=200.0,
    watch_seconds=30.0,
    watch_hold_seconds=5.0,
    watch_batch=100,
    watch_streams_per_connection=250,
    idle_clusters=50,
    idle_connected=10,
    idle_settle=10.0,
    idle_seconds=30.0,
    profile=True,
    profile_seconds=10.0,
    startup_repeats=7,
)

SMOKE = Sizes(
    latency_warmup=5,
    latency_requests=20,
    throughput_concurrency=(1, 16, 64),
    throughput_warmup=0.2,
    throughput_seconds=0.5,
    list_sizes=(50,),
    list_repeats=1,
    watch_streams=10,
    watch_rate=20.0,
    watch_seconds=3.0,
    watch_hold_seconds=1.0,
    watch_batch=10,
    watch_streams_per_connection=250,
    idle_clusters=3,
    idle_connected=2,
    idle_settle=1.0,
    idle_seconds=3.0,
    profile=False,
    profile_seconds=2.0,
    startup_repeats=1,
)


@dataclass
class Bench:
    """Everything a scenario needs."""

    ep: Endpoints
    procs: ProcessSet
    system: System
    cp: ControlPlane
    sizes: Sizes
    out: Path
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        message = f"{what}: {text}"[:500]
        logger.error("FUNCTIONAL FAILURE %s", message)
        self.failures.append(message)


def cpu_report(procs: ProcessSet, before: CPUSnapshot, after: CPUSnapshot) -> dict[str, Any]:
    """CPU seconds per process between two snapshots, and the machine's other load."""
    wall = after.at - before.at
    delta = after.delta(before)
    machine = delta.pop("(machine)", 0.0)
    ours = sum(delta.values())
    return {
        "wall_seconds": round(wall, 3),
        "cpu_seconds": {name: round(value, 4) for name, value in delta.items()},
        # Cores busy with processes outside the benchmark (other work on a shared machine).
        "other_cores": round(max(0.0, machine - ours) / wall, 3) if wall > 0 else math.nan,
    }


# --------------------------------------------------------------------------------------------------
# Set-up


async def prepare(b: Bench) -> None:
    """RBAC for the benchmark user, the namespaces and the small object every Get reads."""
    await prepare_cluster(b.cp, b.ep.kube, b.ep.identity.subject, b.ep.impersonation())


async def prepare_cluster(
    cp: ControlPlane, kube: KubeDirect, subject: str, impersonation: list[tuple[str, str]]
) -> None:
    """:func:`prepare` on a control plane alone: cluster-admin for ``subject``, the namespace and
    the small object, and wait until a read with the ``impersonation`` headers works."""
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "otterscale-bench"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": subject}],
        }
    )
    await kube.ensure_namespace(NAMESPACE)
    await kube.create_configmaps(NAMESPACE, [SMALL_OBJECT], lambda _: {"greeting": "hello"})
    # The binding is in effect once an impersonated read works (RBAC is cached for a moment).
    deadline = time.monotonic() + 30
    path = f"/api/v1/namespaces/{NAMESPACE}/configmaps/{SMALL_OBJECT}"
    while True:
        try:
            await kube.request("GET", path, headers=impersonation)
            break
        except KubeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def kib_payload(name: str) -> dict[str, str]:
    """About 1 KiB per ConfigMap in total (metadata ~0.2 KiB + 800 random hex characters)."""
    return {"payload": secrets.token_hex(400)}


# --------------------------------------------------------------------------------------------------
# Idle


async def idle(b: Bench, configured: int, connected: int) -> dict[str, Any]:
    """Hub RSS and CPU with ``configured`` clusters, ``connected`` of them with a live agent."""
    await asyncio.sleep(b.sizes.idle_settle)
    names = [*HUB_SIDE, *AGENT_SIDE]
    before = b.procs.cpu()
    await asyncio.sleep(b.sizes.idle_seconds)
    after = b.procs.cpu()
    cpu = cpu_report(b.procs, before, after)
    rss = b.procs.rss(names)
    wall = cpu["wall_seconds"]
    percent = {name: round(100.0 * cpu["cpu_seconds"][name] / wall, 3) for name in names}
    return {
        "clusters_configured": configured,
        "clusters_connected": connected,
        "seconds": wall,
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "cpu_percent_of_core": percent,
        "hub_tree_rss_mib": round(sum(rss[name] for name in HUB_SIDE), 1),
        "hub_tree_cpu_percent": round(sum(percent[name] for name in HUB_SIDE), 3),
        "agent_tree_rss_mib": round(sum(rss[name] for name in AGENT_SIDE), 1),
        "agent_tree_cpu_percent": round(sum(percent[name] for name in AGENT_SIDE), 3),
        "other_cores": cpu["other_cores"],
    }


# --------------------------------------------------------------------------------------------------
# Latency


LATENCY_VARIANTS = (
    Variant("direct", "https-json"),
    Variant("agent", "connect-proto"),
    Variant("agent", "connect-json"),
    Variant("agent", "grpc"),
    Variant("hub", "connect-proto"),
    Variant("hub", "connect-json"),
    Variant("hub", "grpc"),
    # Diagnostics: kube-apiserver's own cost of impersonation, the chisel hops without the hub,
    # HTTP/1.1 to the hub, and connectrpc's client defaults (gzip).
    Variant("direct", "https-json+imp"),
    Variant("tunnel", "connect-proto"),
    Variant("hub", "connect-proto", http="h1"),
    Variant("hub", "connect-proto", gzip=True),
)


async def latency(b: Bench) -> list[dict[str, Any]]:
    """Sequential Gets of a small ConfigMap: p50/p90/p99 per path and protocol."""
    rows = []
    for variant in LATENCY_VARIANTS:
        call = make_get(b.ep, variant, NAMESPACE, SMALL_OBJECT)
        samples: list[float] = []
        try:
            for _ in range(b.sizes.latency_warmup):
                await call()
            before = b.procs.cpu()
            for _ in range(b.sizes.latency_requests):
                ms, _ = await timed(call)
                samples.append(ms)
            after = b.procs.cpu()
        except Exception as exc:
            b.fail(f"latency {variant.label}", exc)
            continue
        finally:
            await call.aclose()
        ordered = sorted(samples)
        stats = summary(ordered)
        rows.append(
            {
                "path": variant.path,
                "protocol": variant.protocol,
                "http": variant.http,
                "gzip": variant.gzip,
                "label": variant.label,
                **{k: round(v, 3) for k, v in stats.items()},
                "cdf": [
                    round(ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)], 3)
                    for q in range(1, 101)
                ],
                "other_cores": cpu_report(b.procs, before, after)["other_cores"],
            }
        )
        logger.info(
            "latency %-28s p50 %.2f  p90 %.2f  p99 %.2f ms",
            variant.label,
            stats["p50"],
            stats["p90"],
            stats["p99"],
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Throughput


THROUGHPUT_VARIANTS = (
    Variant("direct", "https-json"),
    Variant("agent", "connect-proto"),
    Variant("hub", "connect-proto"),
    Variant("tunnel", "connect-proto"),  # diagnostic: the chisel hops without the hub
)


async def _load(
    call: Call, concurrency: int, warmup: float, seconds: float, procs: ProcessSet | None
) -> dict[str, Any]:
    """``concurrency`` workers calling back to back; counts, latencies and CPU of the window."""
    stop = False
    done = 0
    errors: list[str] = []
    window: list[float] = []
    measuring = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            started = time.perf_counter()
            try:
                await call()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > 50:
                    return
                continue
            if measuring:
                done += 1
                window.append((time.perf_counter() - started) * 1000.0)

    tasks = [asyncio.create_task(worker(), name=f"bench-load-{i}") for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        threads_before = _threads(procs)
        before = procs.cpu() if procs is not None else None
        measuring = True
        started = time.monotonic()
        await asyncio.sleep(seconds)
        measuring = False
        elapsed = time.monotonic() - started
        after = procs.cpu() if procs is not None else None
        threads_after = _threads(procs)
        count = done
    finally:
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "requests": count,
        "rps": round(count / elapsed, 1),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "latency_ms": {k: round(v, 3) for k, v in summary(window).items()},
    }
    if procs is not None and before is not None and after is not None:
        cpu = cpu_report(procs, before, after)
        result["cpu_seconds"] = cpu["cpu_seconds"]
        result["other_cores"] = cpu["other_cores"]
        result["cpu_seconds_per_1000"] = {
            name: round(1000.0 * value / count, 4) if count else math.nan
            for name, value in cpu["cpu_seconds"].items()
            if name != "(machine)"
        }
        # Inside an Envoy process: the service's Python, Envoy's own threads, pyqwest's runtime.
        result["thread_cpu_seconds_per_1000"] = {
            service: {
                kind: round(1000.0 * (seconds - threads_before[service].get(kind, 0.0)) / count, 4)
                for kind, seconds in kinds.items()
            }
            for service, kinds in threads_after.items()
            if count and kinds
        }
    return result


def _threads(procs: ProcessSet | None) -> dict[str, dict[str, float]]:
    if procs is None:
        return {}
    return {service: procs.threads(service) for service in ("hub", "agent")}


async def throughput(b: Bench) -> list[dict[str, Any]]:
    """Requests/s of Get at each concurrency over each path, with CPU per 1,000 requests."""
    rows = []
    for variant in THROUGHPUT_VARIANTS:
        call = make_get(b.ep, variant, NAMESPACE, SMALL_OBJECT)
        try:
            for concurrency in b.sizes.throughput_concurrency:
                result = await _load(
                    call, concurrency, b.sizes.throughput_warmup, b.sizes.throughput_seconds, b.procs
                )
                if result["errors"]:
                    b.fail(f"throughput {variant.label} c={concurrency}", str(result["first_error"]))
                rows.append(
                    {"path": variant.path, "protocol": variant.protocol, "label": variant.label, **result}
                )
                logger.info("throughput %-22s c=%-3d %8.1f req/s", variant.label, concurrency, result["rps"])
        except Exception as exc:
            b.fail(f"throughput {variant.label}", exc)
        finally:
            await call.aclose()
    return rows


async def profile_get_load(b: Bench, concurrency: int = 16) -> list[dict[str, Any]]:
    """py-spy of hub and agent while Gets go through the hub at ``concurrency``."""
    call = make_get(b.ep, Variant("hub", "connect-proto"), NAMESPACE, SMALL_OBJECT)
    try:
        return await _profiled(
            b, f"get-c{concurrency}", lambda: _load(call, concurrency, 0.0, b.sizes.profile_seconds + 1, None)
        )
    finally:
        await call.aclose()


async def _profiled(b: Bench, tag: str, load: Callable[[], Any]) -> list[dict[str, Any]]:
    """Run ``load`` while py-spy (and perf, if it works) sample the hub and the agent."""
    names = ("hub", "agent")
    folder = b.out / "profiles"
    seconds = b.sizes.profile_seconds
    before = b.procs.cpu()
    recordings = [_profile.record(n, b.procs.pid(n), folder / f"{tag}-{n}.txt", seconds) for n in names]
    perfs = [_profile.perf_record(n, b.procs.pid(n), folder / f"{tag}-{n}.perf", seconds) for n in names]
    await load()
    results = [await asyncio.to_thread(r.finish) for r in recordings]
    after = b.procs.cpu()
    for result, perf, name in zip(results, perfs, names, strict=True):
        result["scenario"] = tag
        # CPU over the whole load run (slightly longer than the sampling window).
        result["cpu_seconds"] = round(after.seconds[name] - before.seconds[name], 2)
        result["load_seconds"] = round(after.at - before.at, 2)
        result["perf"] = await asyncio.to_thread(perf.finish)
    return results


# --------------------------------------------------------------------------------------------------
# Big lists


LIST_VARIANTS = (
    Variant("direct", "https-json"),
    Variant("agent", "connect-proto"),
    Variant("agent", "connect-json"),
    Variant("hub", "connect-proto"),
    Variant("hub", "connect-json"),
    Variant("hub", "connect-proto", gzip=True),
    Variant("tunnel", "connect-proto"),  # diagnostic: the chisel hops without the hub
)


def list_namespace(size: int) -> str:
    return f"{NAMESPACE}-list-{size}"


async def prepare_lists(b: Bench) -> dict[str, float]:
    """Create the ConfigMaps of every list size (once; a rerun on the same cluster reuses them)."""
    return {str(size): await ensure_list_objects(b.ep.kube, size) for size in b.sizes.list_sizes}


async def ensure_list_objects(kube: KubeDirect, size: int) -> float:
    """The ``size`` ConfigMaps of :func:`list_namespace` (existing ones are kept); seconds taken."""
    started = time.monotonic()
    namespace = list_namespace(size)
    await kube.ensure_namespace(namespace)
    await kube.create_configmaps(namespace, [f"cm-{i:05d}" for i in range(size)], kib_payload)
    count = await kube.count(f"/api/v1/namespaces/{namespace}/configmaps")
    if count != size:
        raise RuntimeError(f"namespace {namespace} has {count} ConfigMaps, expected {size}")
    seconds = round(time.monotonic() - started, 2)
    logger.info("created %d ConfigMaps in %.1fs", size, seconds)
    return seconds


async def lists(b: Bench) -> list[dict[str, Any]]:
    """List of N ConfigMaps per path: time (client start -> decoded), bytes, peak RSS."""
    rows = []
    watched = [*HUB_SIDE, *AGENT_SIDE]
    for size in b.sizes.list_sizes:
        for variant in LIST_VARIANTS:
            call = RawList(b.ep, variant, list_namespace(size), size)
            try:
                await call()  # warm-up (connections, discovery cache)
                b.procs.reset_peak(watched)
                before = b.procs.cpu()
                with RSSSampler(b.procs, watched, interval=0.05) as sampler:
                    results = [await timed(call) for _ in range(b.sizes.list_repeats)]
                cpu = cpu_report(b.procs, before, b.procs.cpu())
                peak = b.procs.peak(watched, sampler.maximum())
            except Exception as exc:
                b.fail(f"list {size} {variant.label}", exc)
                continue
            finally:
                await call.aclose()
            times = [ms for ms, _ in results]
            rows.append(
                {
                    "items": size,
                    "path": variant.path,
                    "protocol": variant.protocol,
                    "gzip": variant.gzip,
                    "label": variant.label,
                    "repeats": len(times),
                    "ms_median": round(median(times), 1),
                    "ms_min": round(min(times), 1),
                    "ms_max": round(max(times), 1),
                    "bytes": results[-1][1],
                    "peak_rss_mib": {k: round(v, 1) for k, v in peak.items()},
                    "cpu_seconds_per_list": {
                        k: round(v / len(results), 4) for k, v in cpu["cpu_seconds"].items()
                    },
                    "other_cores": cpu["other_cores"],
                }
            )
            logger.info(
                "list %5d %-24s %8.1f ms %10d bytes",
                size,
                variant.label,
                rows[-1]["ms_median"],
                rows[-1]["bytes"],
            )
    return rows


async def profile_list(b: Bench) -> list[dict[str, Any]]:
    """py-spy of hub and agent while the biggest List goes through the hub back to back."""
    size = max(b.sizes.list_sizes)
    call = RawList(b.ep, Variant("hub", "connect-proto"), list_namespace(size), size)

    async def load() -> None:
        deadline = time.monotonic() + b.sizes.profile_seconds + 1
        while time.monotonic() < deadline:
            await call()

    try:
        return await _profiled(b, f"list-{size}", load)
    finally:
        await call.aclose()


# --------------------------------------------------------------------------------------------------
# Watch


def watch_object(index: int) -> str:
    """The name of the ConfigMap the ``index``-th Watch follows."""
    return f"w-{index:04d}"


async def ensure_watch_objects(kube: KubeDirect, n: int) -> list[str]:
    """The ConfigMaps of ``n`` Watches in WATCH_NAMESPACE (existing ones are kept); their names."""
    names = [watch_object(i) for i in range(n)]
    await kube.ensure_namespace(WATCH_NAMESPACE)
    await kube.create_configmaps(WATCH_NAMESPACE, names, lambda _: {"ts": "0"})
    return names


@dataclass
class ChangeWriter:
    """Changes the ConfigMaps of :func:`ensure_watch_objects` round-robin at a steady ``rate``,
    each change stamped with its write time (``data.ts``, ns since the epoch) so a Watch client
    on this machine can tell how long it took to arrive."""

    kube: KubeDirect
    objects: int
    rate: float
    writes: list[tuple[int, float]] = field(default_factory=list)  # (ts ns, ack ms)
    errors: list[str] = field(default_factory=list)
    skipped: int = 0

    async def _write(self, index: int) -> None:
        stamp = time.time_ns()
        try:
            await self.kube.request(
                "PATCH",
                f"/api/v1/namespaces/{WATCH_NAMESPACE}/configmaps/{watch_object(index % self.objects)}",
                {"data": {"ts": str(stamp)}},
                content_type="application/merge-patch+json",
            )
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        self.writes.append((stamp, (time.time_ns() - stamp) / 1e6))

    async def run(self, seconds: float) -> None:
        """Write for ``seconds``, then wait (bounded) for the writes still in flight."""
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        start = loop.time()
        for k in range(int(seconds * self.rate)):
            delay = start + k / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= 256:  # kube-apiserver cannot keep up: count, do not queue forever
                self.skipped += 1
                continue
            task = asyncio.create_task(self._write(k), name=f"bench-change-{k}")
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=30)

    def stamps(self, since_ns: int, until_ns: int) -> set[int]:
        """The stamps of the acknowledged writes made in [since_ns, until_ns]."""
        return {ts for ts, _ in self.writes if since_ns <= ts <= until_ns}


@dataclass
class _WatchState:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ready_count: int = 0
    target: int = 0
    failures: list[str] = field(default_factory=list)
    closing: bool = False
    ended: int = 0
    # (write timestamp ns, receive timestamp ns) of MODIFIED events
    received: list[tuple[int, int]] = field(default_factory=list)

    def mark_ready(self) -> None:
        self.ready_count += 1
        if self.ready_count >= self.target:
            self.ready.set()


async def watch(b: Bench) -> dict[str, Any]:
    """N Watch streams through the hub (one object each) while objects change at a steady rate."""
    sizes = b.sizes
    n = sizes.watch_streams
    kube = b.ep.kube
    await ensure_watch_objects(kube, n)
    watched = [*HUB_SIDE, *AGENT_SIDE, *CLUSTER_SIDE]
    # The hub serves up to 1,000 streams per HTTP/2 connection; the agent gets them over the hub's
    # own few stream connections whatever the clients do.
    connections = max(1, math.ceil(n / sizes.watch_streams_per_connection))
    clients = [rpc_client(b.ep.hub_url, "connect-proto") for _ in range(connections)]
    headers = b.ep.auth_headers("hub", WATCH_METHOD)
    state = _WatchState()
    tasks: list[asyncio.Task[None]] = []
    result: dict[str, Any] = {
        "streams_requested": n,
        "rate_per_second": sizes.watch_rate,
        "client_connections": connections,
    }
    marks: dict[str, float] = {}

    async def consume(i: int) -> None:
        client = clients[i % len(clients)][0]
        request = pb.WatchRequest(
            cluster=b.ep.cluster,
            version="v1",
            resource="configmaps",
            namespace=WATCH_NAMESPACE,
            field_selector=f"metadata.name={watch_object(i)}",
        )
        counted = False
        try:
            stream = client.watch(request, headers=headers)
            try:
                async for event in stream:
                    if event.type == pb.WatchEvent.TYPE_ADDED and not counted:
                        counted = True
                        state.mark_ready()
                    elif event.type == pb.WatchEvent.TYPE_MODIFIED:
                        now = time.time_ns()
                        data = event.resource.object.fields["data"].struct_value.fields
                        stamp = data["ts"].string_value if "ts" in data else ""
                        if stamp.isdigit():
                            state.received.append((int(stamp), now))
                    elif event.type == pb.WatchEvent.TYPE_ERROR:
                        state.failures.append(f"stream {i}: ERROR event")
                        return
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not state.closing:  # cancelling at the end surfaces as ConnectError(canceled)
                state.failures.append(f"stream {i}: {type(exc).__name__}: {exc}")
        finally:
            state.ended += 1
            if not counted:
                state.mark_ready()  # a failed stream must not hold the ramp up

    writer = ChangeWriter(kube, n, sizes.watch_rate)

    sampler = RSSSampler(b.procs, watched, interval=0.5)
    try:
        b.procs.reset_peak(watched)
        rss_before = b.procs.rss(watched)
        sampler.__enter__()
        t0 = time.monotonic()
        cpu_ramp_start = b.procs.cpu()
        # Ramp up in batches: each batch must be established (initial ADDED event) before the next.
        for start in range(0, n, sizes.watch_batch):
            batch = range(start, min(n, start + sizes.watch_batch))
            state.target = batch[-1] + 1
            state.ready.clear()
            tasks += [asyncio.create_task(consume(i), name=f"bench-watch-{i}") for i in batch]
            try:
                await asyncio.wait_for(state.ready.wait(), 120)
            except TimeoutError:
                b.fail("watch ramp", f"batch at {start} not established within 120s")
                break
            if len(state.failures) > max(5, n // 20):
                b.fail("watch ramp", f"{len(state.failures)} streams failed: {state.failures[:3]}")
                break
        ramp_seconds = time.monotonic() - t0
        marks["ramp_end"] = ramp_seconds
        cpu_ramp_end = b.procs.cpu()
        open_streams = len(tasks) - state.ended
        result["streams_open"] = open_streams
        result["ramp_seconds"] = round(ramp_seconds, 2)
        result["ramp_cpu_seconds"] = cpu_report(b.procs, cpu_ramp_start, cpu_ramp_end)["cpu_seconds"]
        logger.info("watch: %d streams open after %.1fs", open_streams, ramp_seconds)
        # Holding the streams open with nothing changing: what do idle streams cost?
        hold_before = b.procs.cpu()
        await asyncio.sleep(sizes.watch_hold_seconds)
        hold = cpu_report(b.procs, hold_before, b.procs.cpu())
        rss_open = b.procs.rss(watched)
        result["open_idle_cpu_percent_of_core"] = {
            k: round(100.0 * v / hold["wall_seconds"], 2) for k, v in hold["cpu_seconds"].items()
        }

        # Steady state: writes at the target rate; CPU over exactly this window.
        window_start_ns = time.time_ns()
        cpu_before = b.procs.cpu()
        marks["writes_start"] = time.monotonic() - t0
        await writer.run(sizes.watch_seconds)
        cpu_after = b.procs.cpu()
        marks["writes_end"] = time.monotonic() - t0
        window_end_ns = time.time_ns()
        rss_steady = b.procs.rss(watched)

        if sizes.profile:
            # Keep the same write rate while py-spy samples; these events are not counted.
            result["profiles"] = await _profiled(
                b, f"watch-{n}", lambda: writer.run(sizes.profile_seconds + 1)
            )

        # Let the tail of the window's events arrive (bounded).
        expected = writer.stamps(window_start_ns, window_end_ns)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = sum(1 for ts, _ in state.received if ts in expected)
            if got >= len(expected):
                break
            await asyncio.sleep(0.2)
        marks["drained"] = time.monotonic() - t0
    finally:
        state.closing = True
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        for client, http_transport in clients:
            await client.close()
            await http_transport.aclose()
        sampler.__exit__(None, None, None)

    delivered = [(recv - ts) / 1e6 for ts, recv in state.received if ts in expected]
    # The same events measured from the moment kube-apiserver acknowledged the write: this takes
    # the API server's own write latency (which grows when the machine is saturated) out.
    acked = dict(writer.writes)
    after_ack = [(recv - ts) / 1e6 - acked[ts] for ts, recv in state.received if ts in expected]
    missing = len(expected) - len(delivered)
    cpu = cpu_report(b.procs, cpu_before, cpu_after)
    wall = cpu["wall_seconds"]
    peak = b.procs.peak(watched, sampler.maximum())
    result.update(
        {
            "window_seconds": wall,
            "writes": len(expected),
            "writes_per_second": round(len(expected) / wall, 1) if wall else math.nan,
            "writes_skipped": writer.skipped,
            "write_errors": len(writer.errors),
            "write_ack_ms": {
                k: round(v, 3) for k, v in summary([ms for ts, ms in writer.writes if ts in expected]).items()
            },
            "delivered": len(delivered),
            "missing": missing,
            "delivery_ms": {k: round(v, 3) for k, v in summary(delivered).items()},
            "delivery_cdf": [round(v, 3) for v in cdf_points(delivered)],
            "delivery_after_ack_ms": {k: round(v, 3) for k, v in summary(after_ack).items()},
            "rss_mib_before": {k: round(v, 1) for k, v in rss_before.items()},
            "rss_mib_open": {k: round(v, 1) for k, v in rss_open.items()},
            "rss_mib_steady": {k: round(v, 1) for k, v in rss_steady.items()},
            "peak_rss_mib": {k: round(v, 1) for k, v in peak.items()},
            "hub_tree_peak_rss_mib": round(sum(peak[name] for name in HUB_SIDE), 1),
            "cpu_percent_of_core": {k: round(100.0 * v / wall, 2) for k, v in cpu["cpu_seconds"].items()},
            "other_cores": cpu["other_cores"],
            "stream_failures": len(state.failures),
            "first_stream_failures": state.failures[:5],
            "timeline": [
                [round(t, 2), {k: round(v, 1) for k, v in values.items()}] for t, values in sampler.samples
            ],
            "marks": {k: round(v, 2) for k, v in marks.items()},
        }
    )
    if writer.errors:
        b.fail("watch writes", f"{len(writer.errors)} failed, first: {writer.errors[0]}")
    if state.failures:
        b.fail("watch streams", f"{len(state.failures)} failed, first: {state.failures[0]}")
    if missing > max(0, len(expected) // 100):
        b.fail("watch delivery", f"{missing} of {len(expected)} changes never reached a client")
    logger.info(
        "watch: %d streams, %d writes, p50 %.1f ms, p99 %.1f ms, missing %d",
        result["streams_open"],
        len(expected),
        result["delivery_ms"]["p50"],
        result["delivery_ms"]["p99"],
        missing,
    )
    return result


def cdf_points(values: Sequence[float]) -> list[float]:
    ordered = sorted(values)
    if not ordered:
        return []
    return [ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)] for q in range(1, 101)]


# --------------------------------------------------------------------------------------------------
# Start-up


def _spawn_until(
    argv: list[str], url: str, expected: tuple[int, ...], log: Path
) -> tuple[float, dict[str, Any]]:
    """Start ``argv``; seconds until ``url`` answers one of ``expected``, and the start-up
    breakdown the service logged with its ready line (if it does); then stop it (SIGTERM)."""
    import json
    import signal
    import subprocess
    import urllib.error
    import urllib.request

    with log.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv[1]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310 - loopback
                        status = answer.status
                except urllib.error.HTTPError as exc:
                    status = exc.code
                except OSError:
                    status = 0
                if status in expected:
                    elapsed = time.monotonic() - started
                    break
                if time.monotonic() - started > 120:
                    raise RuntimeError(f"{argv[1]} not ready after 120s: {log.read_text()[-2000:]}")
                time.sleep(0.005)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    breakdown: dict[str, Any] = {}
    for line in log.read_text(errors="replace").splitlines():
        if "ready at" in line and line.startswith("{"):
            with contextlib.suppress(ValueError):
                breakdown = dict(json.loads(line).get("startup_ms") or {})
    return elapsed, breakdown


async def startup(b: Bench, repeats: int) -> dict[str, Any]:
    """Process spawn -> ready: a hub (``/readyz`` 200, its tunnel server up) and an agent without a
    tunnel (``/ping`` 204), ``repeats`` times each, with the breakdown each reports."""
    import yaml

    from otterscale.testing import free_port

    system = b.system
    folder = b.out / "work" / "startup"
    folder.mkdir(parents=True, exist_ok=True)
    document = system.config()
    document["tunnel"]["server"]["port"] = free_port()  # beside the running hub
    config = folder / "otterscale.yaml"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        yaml.safe_dump(document, out)
    cluster = next(name for name, entry in system.clusters.items() if entry.control_plane is not None)
    kubeconfig = system.clusters[cluster].control_plane.kubeconfig  # type: ignore[union-attr]
    rows: dict[str, Any] = {}
    for service in ("hub", "agent"):
        times: list[float] = []
        breakdowns: list[dict[str, Any]] = []
        for attempt in range(repeats):
            port = free_port()
            if service == "hub":
                argv = [*system.command, "server", f"--address=127.0.0.1:{port}", f"--config={config}"]
                argv += [f"--chisel={system.chisel}", "--log-format=json", "--log-level=info"]
                if system.separate_management:
                    argv.append(f"--management-address=127.0.0.1:{free_port()}")
                url, expected = f"http://127.0.0.1:{port}/readyz", (200,)
            else:
                argv = [*system.command, "agent", f"--cluster={cluster}", f"--address=127.0.0.1:{port}"]
                argv += [
                    f"--config={config}",
                    f"--kubeconfig={kubeconfig}",
                    "--no-tunnel",
                    "--log-format=json",
                ]
                url, expected = f"http://127.0.0.1:{port}/ping", (200, 204)
            log = folder / f"{service}-{attempt}.log"
            try:
                seconds, breakdown = await asyncio.to_thread(_spawn_until, argv, url, expected, log)
            except Exception as exc:
                b.fail(f"startup {service}", exc)
                break
            times.append(seconds)
            breakdowns.append(breakdown)
        if times:
            rows[service] = {
                "seconds": [round(t, 3) for t in times],
                "median_s": round(median(times), 3),
                "breakdown_ms": breakdowns[len(breakdowns) // 2] if breakdowns else {},
            }
            logger.info("startup %s: median %.3fs of %s", service, median(times), rows[service]["seconds"])
    return rows
