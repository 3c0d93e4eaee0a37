"""Scenario ``kubeclient``: the agent's HTTP client to kube-apiserver, aiohttp against pyqwest.

Issue 14 item 2 asks which client the agent should use to call kube-apiserver: aiohttp, which
ships (HTTP/1.1), or pyqwest (HTTP/2 in Rust; already installed under connectrpc). Each client
runs in a worker process of its own (:mod:`._kubeclient_worker`), so the CPU and memory each
reports are its own; the two are driven from here, against the benchmark's kube-apiserver over
TLS with the agent's kubeconfig (admin client certificate), every call impersonating the
benchmark user as the agent impersonates its callers. Neither hub nor agent is involved.

The machine is shared, so the clients take turns in short rounds, and the order flips every
round (A B, B A, ...): a change in the machine's other load falls on both alike. What is
measured, per client:

- Get: sequential Gets of one small ConfigMap: latency p50/p99, CPU seconds of the client process
  per 1,000 Gets (and kube-apiserver's); the same ``get_concurrency`` at a time (as the agent
  serves concurrent callers), with requests/s;
- List: a List of ``list_items`` ConfigMaps (~1 KiB each): time until the body is read, client
  CPU per List, peak RSS of the client during it;
- Watch: ``watches`` concurrent Watches (one object each): time to open all (each established
  when its object's ADDED event arrived), CPU and RSS with them open and quiet, then changes at
  ``watch_rate`` per second (written from this process): delivery latency (write stamp ->
  line received by the client) p50/p99, client CPU, RSS, kube-apiserver CPU; TCP connections
  the client holds to kube-apiserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from otterscale.agent._kube import impersonation_headers
from otterscale.common import Identity
from otterscale.testing import ControlPlane

from ._kube import KubeDirect
from ._kubeclient_worker import CLIENTS
from ._procs import CPUSnapshot, ProcessSet
from ._scenarios import (
    CLIENT,
    NAMESPACE,
    SMALL_OBJECT,
    WATCH_NAMESPACE,
    ChangeWriter,
    cpu_report,
    ensure_list_objects,
    ensure_watch_objects,
    list_namespace,
    prepare_cluster,
)
from ._stats import median, summary

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parents[1]
WORKER = "otterscale_bench._kubeclient_worker"
APISERVER = "kube-apiserver"


@dataclasses.dataclass(frozen=True)
class KubeClientSizes:
    """How much the scenario does (``FULL`` by default, ``SMOKE`` in CI)."""

    get_warmup: int
    get_rounds: int
    gets_per_round: int
    get_concurrency: int
    concurrent_gets_per_round: int
    list_items: int
    list_repeats: int
    watches: int
    watch_batch: int
    watch_rate: float
    watch_seconds: float
    watch_quiet_seconds: float
    watch_rounds: int


FULL = KubeClientSizes(
    get_warmup=200,
    get_rounds=6,
    gets_per_round=500,
    get_concurrency=16,
    concurrent_gets_per_round=1000,
    list_items=5000,
    list_repeats=6,
    watches=1000,
    watch_batch=100,
    watch_rate=100.0,
    watch_seconds=20.0,
    watch_quiet_seconds=5.0,
    watch_rounds=2,
)

SMOKE = KubeClientSizes(
    get_warmup=5,
    get_rounds=2,
    gets_per_round=10,
    get_concurrency=4,
    concurrent_gets_per_round=20,
    list_items=50,
    list_repeats=2,
    watches=10,
    watch_batch=10,
    watch_rate=20.0,
    watch_seconds=2.0,
    watch_quiet_seconds=0.5,
    watch_rounds=1,
)


class WorkerError(RuntimeError):
    """A worker answered a command with an error, died, or did not answer in time."""


class WorkerProcess:
    """One client's worker: a child process spoken to by JSON lines on its stdin and stdout."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], log: Path) -> WorkerProcess:
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                WORKER,
                "--client",
                name,
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(BENCH_DIR)},
                start_new_session=True,  # its own group: stop() reaches whatever it started
                limit=64 * 1024 * 1024,
            )
        worker = cls(name, proc)
        try:
            await worker._read(60)
        except BaseException:
            await worker.stop()
            raise
        return worker

    async def call(self, op: str, within: float = 300, **args: Any) -> dict[str, Any]:
        """Run command ``op`` in the worker; its result (WorkerError if none ``within`` seconds)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        answer = await self._read(within)
        if "error" in answer:
            raise WorkerError(f"{self.name} {op}: {answer['error']}")
        result: dict[str, Any] = answer["ok"]
        return result

    async def _read(self, within: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        except TimeoutError as exc:
            raise WorkerError(f"{self.name}: no answer within {within:g} s") from exc
        if not line:
            raise WorkerError(f"{self.name}: exited ({await self.proc.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self) -> None:
        """Ask it to exit (it closes its Watches and client), then SIGKILL its group if it lingers."""
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


def _order(round_: int) -> tuple[str, ...]:
    """The clients in the order of ``round_``: flipped every round."""
    return CLIENTS if round_ % 2 == 0 else tuple(reversed(CLIENTS))


def _connections(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to ``port`` (kube-apiserver's)."""
    with contextlib.suppress(psutil.Error):
        return sum(
            1
            for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        )
    return 0


@dataclasses.dataclass
class _Run:
    workers: dict[str, WorkerProcess]
    procs: ProcessSet
    cp: ControlPlane
    kube: KubeDirect
    sizes: KubeClientSizes
    failures: list[str]

    async def start_workers(self, argv: list[str], work: Path) -> None:
        """(Re)start one worker per client; the process set follows."""
        for worker in self.workers.values():
            await worker.stop()
        self.workers.clear()
        for name in CLIENTS:
            self.workers[name] = await WorkerProcess.start(name, argv, work / f"{name}.log")
        pids = {name: w.pid for name, w in self.workers.items()}
        for process in self.cp.processes:  # kube-apiserver, etcd: theirs is not "other" load
            pids[process.name.rsplit("/", 1)[-1]] = process.pid
        self.procs = ProcessSet({**pids, CLIENT: os.getpid()})

    def fail(self, what: str, text: str) -> None:
        message = f"kubeclient {what}: {text}"[:500]
        logger.error("FUNCTIONAL FAILURE %s", message)
        self.failures.append(message)

    def cpu(self, before: CPUSnapshot, after: CPUSnapshot) -> dict[str, Any]:
        return cpu_report(self.procs, before, after)


async def run(
    work: Path, cp: ControlPlane, identity: Identity, sizes: KubeClientSizes, failures: list[str]
) -> dict[str, Any]:
    """The whole scenario; functional failures are appended to ``failures``."""
    work.mkdir(parents=True, exist_ok=True)
    kube = KubeDirect(cp)
    result: dict[str, Any] = {"sizes": dataclasses.asdict(sizes), "loadavg_start": list(os.getloadavg())}
    workers: dict[str, WorkerProcess] = {}
    try:
        await prepare_cluster(cp, kube, identity.subject, impersonation_headers(identity))
        await ensure_list_objects(kube, sizes.list_items)
        names = await ensure_watch_objects(kube, sizes.watches)
        argv = [f"--kubeconfig={cp.kubeconfig}", f"--ca={cp.ca_file}", f"--cert={cp.admin_cert}"]
        argv += [f"--key={cp.admin_key}", f"--subject={identity.subject}"]
        argv += [f"--group={group}" for group in identity.groups]
        r = _Run(workers, ProcessSet({}), cp, kube, sizes, failures)
        await r.start_workers(argv, work)
        result["rss_mib_start"] = {name: (await w.call("rss"))["rss_mib"] for name, w in workers.items()}
        result["get"] = await _gets(r, 1)
        result["get_concurrent"] = await _gets(r, sizes.get_concurrency)
        result["list"] = await _lists(r)
        # Fresh processes for the Watches: the memory a List took is not given back to the system.
        await r.start_workers(argv, work)
        result["watch"] = await _watches(r, names)
    finally:
        for worker in workers.values():
            await worker.stop()
        await kube.aclose()
        result["loadavg_end"] = list(os.getloadavg())
    return result


GET_PATH = f"/api/v1/namespaces/{NAMESPACE}/configmaps/{SMALL_OBJECT}"


async def _gets(r: _Run, concurrency: int) -> dict[str, Any]:
    """Gets of the small ConfigMap in rounds, sequential (``concurrency`` 1) or ``concurrency``
    at a time: latency, requests/s, client and kube-apiserver CPU per 1,000."""
    for worker in r.workers.values():  # connections (aiohttp: one per call in flight), TLS, caches
        if concurrency == 1:
            await worker.call("get", path=GET_PATH, n=r.sizes.get_warmup)
        else:
            await worker.call("get_concurrent", path=GET_PATH, n=r.sizes.get_warmup, concurrency=concurrency)
    samples: dict[str, list[float]] = {name: [] for name in CLIENTS}
    totals = {name: {"client": 0.0, "apiserver": 0.0, "wall": 0.0} for name in CLIENTS}
    other: dict[str, list[float]] = {name: [] for name in CLIENTS}
    for round_ in range(r.sizes.get_rounds):
        for name in _order(round_):
            before = r.procs.cpu()
            if concurrency == 1:
                out = await r.workers[name].call("get", path=GET_PATH, n=r.sizes.gets_per_round)
                if out["name"] != SMALL_OBJECT:
                    r.fail(f"get {name}", f"read {out['name']!r}, expected {SMALL_OBJECT!r}")
            else:
                n = r.sizes.concurrent_gets_per_round
                out = await r.workers[name].call(
                    "get_concurrent", path=GET_PATH, n=n, concurrency=concurrency
                )
            cpu = r.cpu(before, r.procs.cpu())
            samples[name] += out["ms"]
            totals[name]["client"] += out["cpu_seconds"]
            totals[name]["wall"] += out["wall_seconds"]
            totals[name]["apiserver"] += cpu["cpu_seconds"][APISERVER]
            other[name].append(cpu["other_cores"])
    rows = {}
    for name in CLIENTS:
        count, spent = len(samples[name]), totals[name]
        stats = summary(samples[name])
        rows[name] = {
            "concurrency": concurrency,
            "requests": count,
            "rps": round(count / spent["wall"], 1) if spent["wall"] else math.nan,
            **{k: round(v, 3) for k, v in stats.items() if k != "count"},
            "cpu_seconds_per_1000": round(1000.0 * spent["client"] / count, 4) if count else math.nan,
            "apiserver_cpu_seconds_per_1000": round(1000.0 * spent["apiserver"] / count, 4)
            if count
            else math.nan,
            "other_cores": round(median(other[name]), 3),
        }
        logger.info(
            "kubeclient get c=%d %-10s p50 %.2f  p99 %.2f ms  %.0f req/s  CPU %.3f s per 1,000",
            concurrency,
            name,
            stats["p50"],
            stats["p99"],
            rows[name]["rps"],
            rows[name]["cpu_seconds_per_1000"],
        )
    return rows


async def _lists(r: _Run) -> dict[str, Any]:
    items = r.sizes.list_items
    path = f"/api/v1/namespaces/{list_namespace(items)}/configmaps"
    for worker in r.workers.values():
        await worker.call("list", path=path)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CLIENTS}
    for repeat in range(r.sizes.list_repeats):
        for name in _order(repeat):
            before = r.procs.cpu()
            out = await r.workers[name].call("list", path=path)
            cpu = r.cpu(before, r.procs.cpu())
            if out["items"] != items:
                r.fail(f"list {name}", f"{out['items']} items, expected {items}")
            runs[name].append({**out, "apiserver_cpu_seconds": cpu["cpu_seconds"][APISERVER]})
            runs[name][-1]["other_cores"] = cpu["other_cores"]
    rows = {}
    for name in CLIENTS:
        done = runs[name]
        times = [x["ms"] for x in done]
        rows[name] = {
            "items": items,
            "repeats": len(done),
            "ms_median": round(median(times), 1),
            "ms_min": round(min(times), 1),
            "ms_max": round(max(times), 1),
            "bytes": done[-1]["bytes"],
            "cpu_seconds_median": round(median([x["cpu_seconds"] for x in done]), 4),
            "apiserver_cpu_seconds_median": round(median([x["apiserver_cpu_seconds"] for x in done]), 4),
            "peak_rss_mib": max(x["peak_rss_mib"] for x in done),
            "other_cores": round(median([x["other_cores"] for x in done]), 3),
        }
        logger.info("kubeclient list %d %-8s %.1f ms", items, name, rows[name]["ms_median"])
    return rows


async def _watches(r: _Run, names: list[str]) -> dict[str, Any]:
    path = f"/api/v1/namespaces/{WATCH_NAMESPACE}/configmaps"
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CLIENTS}
    for round_ in range(r.sizes.watch_rounds):
        for name in _order(round_):
            rounds[name].append(await _watch_round(r, name, path, names))
    return {name: _watch_summary(name, rounds[name], r.sizes) for name in CLIENTS}


async def _watch_round(r: _Run, name: str, path: str, names: list[str]) -> dict[str, Any]:
    """One client's Watches: open, quiet, changes at the rate, close."""
    worker, sizes = r.workers[name], r.sizes
    out: dict[str, Any] = {}
    before = r.procs.cpu()
    opened = await worker.call("watch_open", within=1800, path=path, names=names, batch=sizes.watch_batch)
    out["open"] = {**opened, "apiserver_cpu_seconds": r.cpu(before, r.procs.cpu())["cpu_seconds"][APISERVER]}
    out["connections"] = _connections(worker.pid, r.cp.port)
    if opened["open"] < len(names) or opened["failure_count"]:
        r.fail(f"watch {name}", f"{opened['open']} of {len(names)} open, failures {opened['failures']}")
    try:
        # Open and quiet: what idle Watches cost.
        await worker.call("watch_mark")
        before = r.procs.cpu()
        await asyncio.sleep(sizes.watch_quiet_seconds)
        quiet = await worker.call("watch_sample")
        out["quiet"] = {**quiet, "machine": r.cpu(before, r.procs.cpu())}
        # Changes at the steady rate.
        writer = ChangeWriter(r.kube, len(names), sizes.watch_rate)
        await worker.call("watch_mark")
        since = time.time_ns()
        before = r.procs.cpu()
        await writer.run(sizes.watch_seconds)
        machine = r.cpu(before, r.procs.cpu())
        steady = await worker.call("watch_sample")
        until = time.time_ns()
        expected = sorted(writer.stamps(since, until))
        delivered = await worker.call("watch_deliveries", within=60, expected=expected, wait_seconds=10.0)
        out["steady"] = {**steady, "machine": machine, "writes": len(expected), **delivered}
        if writer.errors:
            r.fail(f"watch {name} writes", f"{len(writer.errors)} failed, first: {writer.errors[0]}")
        if delivered["missing"] > len(expected) // 100:
            r.fail(f"watch {name}", f"{delivered['missing']} of {len(expected)} changes never arrived")
    finally:
        closed = await worker.call("watch_close", within=120)
    out["close"] = closed
    if closed["failure_count"] > opened["failure_count"]:
        r.fail(f"watch {name}", f"streams failed while open: {closed['failures']}")
    logger.info(
        "kubeclient watch %-8s %d open in %.1f s over %d connections; delivery p50 %.1f p99 %.1f ms",
        name,
        opened["open"],
        opened["open_seconds"],
        out["connections"],
        summary(out.get("steady", {}).get("delivery_ms", []))["p50"],
        summary(out.get("steady", {}).get("delivery_ms", []))["p99"],
    )
    return out


def _watch_summary(name: str, rounds: list[dict[str, Any]], sizes: KubeClientSizes) -> dict[str, Any]:
    """One client's Watch rounds: medians of the per-round figures, percentiles of the pooled
    latencies, maxima of memory."""
    done = [x for x in rounds if "steady" in x]
    delivery = [ms for x in done for ms in x["steady"]["delivery_ms"]]
    first = [ms for x in rounds for ms in x["open"]["first_event_ms"]]

    def percent(seconds: float, wall: float) -> float:
        return round(100.0 * seconds / wall, 2) if wall else math.nan

    steady_cpu = [percent(x["steady"]["cpu_seconds"], x["steady"]["wall_seconds"]) for x in done]
    steady_api = [
        percent(x["steady"]["machine"]["cpu_seconds"][APISERVER], x["steady"]["machine"]["wall_seconds"])
        for x in done
    ]
    quiet_cpu = [percent(x["quiet"]["cpu_seconds"], x["quiet"]["wall_seconds"]) for x in done]
    quiet_api = [
        percent(x["quiet"]["machine"]["cpu_seconds"][APISERVER], x["quiet"]["machine"]["wall_seconds"])
        for x in done
    ]
    writes = sum(x["steady"]["writes"] for x in done)
    client_seconds = sum(x["steady"]["cpu_seconds"] for x in done)
    return {
        "rounds": len(rounds),
        "streams": sizes.watches,
        "open": min(x["open"]["open"] for x in rounds),
        "http_version": rounds[-1]["open"]["http_version"],
        "connections": max(x["connections"] for x in rounds),
        "open_seconds": round(median([x["open"]["open_seconds"] for x in rounds]), 2),
        "open_cpu_seconds": round(median([x["open"]["cpu_seconds"] for x in rounds]), 3),
        "open_apiserver_cpu_seconds": round(median([x["open"]["apiserver_cpu_seconds"] for x in rounds]), 3),
        "first_event_ms": {k: round(v, 2) for k, v in summary(first).items()},
        "quiet_cpu_percent": round(median(quiet_cpu), 2) if quiet_cpu else math.nan,
        "quiet_apiserver_cpu_percent": round(median(quiet_api), 2) if quiet_api else math.nan,
        "writes": writes,
        "writes_per_second": round(writes / sum(x["steady"]["machine"]["wall_seconds"] for x in done), 1)
        if done
        else math.nan,
        "missing": sum(x["steady"]["missing"] for x in done),
        "delivery_ms": {k: round(v, 2) for k, v in summary(delivery).items()},
        "cpu_percent": round(median(steady_cpu), 2) if steady_cpu else math.nan,
        "cpu_seconds_per_1000_events": round(1000.0 * client_seconds / writes, 3) if writes else math.nan,
        "apiserver_cpu_percent": round(median(steady_api), 2) if steady_api else math.nan,
        # The first round's process is fresh: its RSS before is the client's at rest.
        # (Later rounds start with what the earlier ones left allocated: see per_round.)
        "rss_mib_rest": rounds[0]["open"]["rss_mib_rest"],
        "rss_mib_open": rounds[0]["open"]["rss_mib_open"],
        "peak_rss_mib": rounds[0].get("steady", {}).get("peak_rss_mib", math.nan),
        "rss_mib_after_close": rounds[0]["close"]["rss_mib"],
        "per_round": [
            {
                "open_seconds": round(x["open"]["open_seconds"], 2),
                "connections": x["connections"],
                "rss_mib": {
                    "before": x["open"]["rss_mib_rest"],
                    "open": x["open"]["rss_mib_open"],
                    "peak": x.get("steady", {}).get("peak_rss_mib"),
                    "after_close": x["close"]["rss_mib"],
                },
                "delivery_ms": {
                    k: round(v, 2) for k, v in summary(x.get("steady", {}).get("delivery_ms", [])).items()
                },
            }
            for x in rounds
        ],
        "close_seconds": round(median([x["close"]["close_seconds"] for x in rounds]), 2),
        "other_cores": round(median([x["steady"]["machine"]["other_cores"] for x in done]), 3)
        if done
        else math.nan,
    }
