"""The soak run: set up, drive traffic under faults, recover, check, report.

1. A real control plane (etcd, kube-apiserver, kube-controller-manager), a local OIDC issuer,
   two hub replicas with Lease leader election and one agent per cluster (``alpha``, ``beta``)
   behind the leader relay (:func:`otterscale.testing.start_hub_replicas`). Both clusters use
   the same control plane by default (frugal: two clusters as the hub sees them, each with its own
   agent, tunnel and namespace); ``--two-control-planes`` gives ``beta`` its own.
2. ``--workers`` clients and one watcher per cluster run for ``--duration`` seconds. After
   ``--warmup`` seconds the baselines of RSS and fds are taken and the fault injector starts.
3. When the time is up: no more faults, every component is brought back, the system must recover
   (a leader, every agent connected, every replica serving) within ``RECOVERY_TIMEOUT``; then the
   workers stop, the watchers must converge to the cluster's real state, traffic stops.
4. Checks: every object's state in the cluster (read as admin) against what its last successful
   write said; the watchers' views against the same; no unexpected error code; RSS and fds of
   every long-lived process of ours against its baseline; no relayed connection left open
   beyond the agents' tunnels.
5. A summary on stdout and as JSON in ``results/soak-<UTC time>.json``; exit status 1 on any
   failed check (the logs directory is kept then and named in the summary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import (
    ControlPlane,
    HubReplicas,
    LocalIssuer,
    caller_rbac,
    create_namespace,
    start_control_plane,
    start_hub_replicas,
)

from ._faults import WEIGHTS, FaultInjector
from ._procs import ProcessWatch, Tracked, by_parent, describe_fds, read
from ._traffic import UNKNOWN, Stats, Watcher, Worker

logger = logging.getLogger("soak")

ROOT = Path(__file__).resolve().parents[2]
CLIENT_ID = "otterscale"
USERS = ("alice", "bob")
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
CLUSTERS = ("alpha", "beta")
REPLICAS = 2
RECOVERY_TIMEOUT = 120.0
CONVERGE_TIMEOUT = 30.0
#: Kinds of our own processes whose RSS and fds must not grow (kube-apiserver and etcd are only
#: reported: their caches grow with the number of objects and watchers, by design).
CHECKED_KINDS = ("hub", "agent", "hub-chisel", "agent-chisel")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nox -s soak --", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before faults and baselines (default min(20, duration/5))",
    )
    parser.add_argument("--workers", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument(
        "--fault-interval", type=float, default=5.0, help="mean seconds between faults (default 5)"
    )
    parser.add_argument(
        "--faults",
        type=_fault_kinds,
        default=tuple(WEIGHTS),
        metavar="KIND,...",
        help=f"the fault kinds to inject (default all: {','.join(WEIGHTS)}); leaving agent_kill out lets "
        "the agents live the whole run, so their fd and memory checks span it",
    )
    parser.add_argument("--no-apiserver-faults", action="store_true", help="never restart kube-apiserver")
    parser.add_argument(
        "--two-control-planes", action="store_true", help="give cluster beta its own control plane"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=50.0,
        help="allowed RSS growth per process (default 50 MiB)",
    )
    parser.add_argument(
        "--fd-slack", type=int, default=8, help="allowed extra open fds per process (default 8)"
    )
    parser.add_argument(
        "--process-warmup", type=float, default=10.0, help="seconds a process runs before its baseline"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="where the JSON summary goes")
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs directory even when the run passes"
    )
    args = parser.parse_args(argv)
    if args.no_apiserver_faults:
        args.faults = tuple(k for k in args.faults if k != "apiserver_restart")
    return args


def _fault_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in WEIGHTS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown fault kind(s) {unknown or [text]}; choose from {', '.join(WEIGHTS)}"
        )
    return kinds


@dataclass
class Outcome:
    """Everything the summary reports."""

    seed: int
    duration: float
    started_at: str
    checks: dict[str, list[str]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def fail(self, check: str, text: str) -> None:
        self.checks.setdefault(check, []).append(text)

    @property
    def passed(self) -> bool:
        return not any(self.checks.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("otterscale.testing", "aiohttp", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    warmup = args.warmup if args.warmup is not None else min(20.0, args.duration / 5)
    directory = Path(tempfile.mkdtemp(prefix="otterscale-soak-"))
    outcome = Outcome(
        seed=seed, duration=args.duration, started_at=datetime.now(UTC).isoformat(timespec="seconds")
    )
    logger.info("soak: %ss of traffic, seed %d, logs in %s", args.duration, seed, directory)
    issuer = LocalIssuer().start()
    control_planes: dict[str, ControlPlane] = {}
    try:
        control_planes["alpha"] = start_control_plane("soak-alpha", directory / "cp-alpha")
        if args.two_control_planes:
            control_planes["beta"] = start_control_plane("soak-beta", directory / "cp-beta")
        else:
            control_planes["beta"] = control_planes["alpha"]
        asyncio.run(_soak(args, seed, warmup, directory, issuer, control_planes, outcome))
    except Exception as exc:
        logger.exception("the soak could not run to the end")
        outcome.fail("ran to the end", f"{type(exc).__name__}: {exc}")
    finally:
        for cp in {id(cp): cp for cp in control_planes.values()}.values():
            cp.stop()
        issuer.stop()
    outcome.data["logs"] = str(directory)
    path = _write(args.results, outcome)
    _print_summary(outcome, path)
    if outcome.passed and not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    return 0 if outcome.passed else 1


async def _soak(
    args: argparse.Namespace,
    seed: int,
    warmup: float,
    directory: Path,
    issuer: LocalIssuer,
    control_planes: dict[str, ControlPlane],
    outcome: Outcome,
) -> None:
    rng = random.Random(seed)
    suffix = secrets.token_hex(3)
    namespaces = {cluster: f"soak-{cluster}-{suffix}" for cluster in CLUSTERS}
    for cluster, namespace in namespaces.items():
        cp = control_planes[cluster]
        create_namespace(cp, namespace)
        for obj in caller_rbac(namespace, users=USERS, verbs=VERBS):
            cp.apply(obj)
    started = time.monotonic()
    replicas = await start_hub_replicas(
        control_planes["alpha"],
        directory / "ha",
        realm_url=issuer.url,
        client_id=CLIENT_ID,
        replicas=REPLICAS,
        clusters={cluster: control_planes[cluster].kubeconfig for cluster in CLUSTERS},
        users=USERS,
        verbs=VERBS,
        within=120.0,
    )
    outcome.data["setup_seconds"] = round(time.monotonic() - started, 1)
    urls = [replicas.url(i) for i in range(REPLICAS)]
    stats = Stats()
    token = {user: issuer.token(user, ("soak",), audience=CLIENT_ID, lifetime=6 * 3600.0) for user in USERS}
    workers = [
        Worker(
            n,
            namespaces,
            urls,
            token[USERS[n % len(USERS)]],
            stats,
            seed=rng.randrange(2**31),
            op_budget=90.0,
        )
        for n in range(args.workers)
    ]
    watchers = [
        Watcher(cluster, namespaces[cluster], urls, token["alice"], stats, seed=rng.randrange(2**31))
        for cluster in CLUSTERS
    ]
    procs = ProcessWatch(warmup=args.process_warmup)
    injector = FaultInjector(
        replicas,
        list({id(cp): cp for cp in control_planes.values()}.values()),
        interval=args.fault_interval,
        seed=rng.randrange(2**31),
        kinds=args.faults,
        apiserver=stats.apiserver,
    )
    tasks: dict[str, asyncio.Task[None]] = {}
    sampler = asyncio.create_task(_sample(procs, replicas, control_planes), name="soak-sampler")
    try:
        for worker in workers:
            tasks[f"worker-{worker.number}"] = asyncio.create_task(
                _guard(worker.run(), stats, f"worker-{worker.number}"), name=f"worker-{worker.number}"
            )
        for watcher in watchers:
            tasks[f"watch-{watcher.cluster}"] = asyncio.create_task(
                _guard(watcher.run(), stats, f"watch-{watcher.cluster}"), name=f"watch-{watcher.cluster}"
            )
        traffic_started = time.monotonic()
        await asyncio.sleep(warmup)
        procs.baselines_from = time.monotonic()
        faults = asyncio.create_task(_guard(injector.run(), stats, "faults"), name="soak-faults")
        await asyncio.sleep(max(0.0, args.duration - warmup))
        injector.stop()
        await faults
        fault_phase = time.monotonic() - procs.baselines_from
        logger.info("faults stopped (%s); restoring and waiting for recovery", dict(injector.injected))

        recovered_at = time.monotonic()
        await _restore(replicas)
        try:
            await _until(lambda: _recovered(replicas, token["alice"], namespaces), RECOVERY_TIMEOUT)
            outcome.data["recovery_seconds"] = round(time.monotonic() - recovered_at, 1)
        except TimeoutError:
            outcome.fail("recovered after the faults", f"not within {RECOVERY_TIMEOUT}s")
        for worker in workers:
            worker.stopping.set()
        await asyncio.wait([tasks[f"worker-{w.number}"] for w in workers], timeout=120)
        traffic_seconds = time.monotonic() - traffic_started

        truth = {cluster: _truth(control_planes[cluster], namespaces[cluster]) for cluster in CLUSTERS}
        for watcher in watchers:
            try:
                await _until(lambda w=watcher: _converged(w, truth[w.cluster]), CONVERGE_TIMEOUT)
            except TimeoutError:
                diff = _diff(watcher.view, truth[watcher.cluster])
                outcome.fail(
                    "watches saw every change", f"{watcher.cluster}: view differs from the cluster: {diff}"
                )
        for name, task in tasks.items():
            if name.startswith("watch-"):
                task.cancel()
        await asyncio.wait(tasks.values(), timeout=30)
        for worker in workers:
            await worker.close()
        for watcher in watchers:
            await watcher.close()

        _check_model(workers, truth, outcome)
        for text in stats.violations:
            outcome.fail("no lost writes, stale reads or resurrected deletes", text)
        for text in stats.unexpected:
            outcome.fail("no unexpected error codes", text)

        # Traffic has stopped and the clients' connections are closed: let the servers notice,
        # then sample until two consecutive readings of the fds agree (at most 15 s).
        await _quiesce(procs)
        procs.finish()
        _check_processes(procs, args, outcome)
        relay_open = replicas.relay.open
        if relay_open > len(replicas.agents):
            outcome.fail(
                "no leaked relay connections", f"{relay_open} open for {len(replicas.agents)} agents"
            )

        outcome.data.update(
            {
                "traffic_seconds": round(traffic_seconds, 1),
                "fault_seconds": round(fault_phase, 1),
                "warmup_seconds": warmup,
                "workers": args.workers,
                "requests": _nested(stats.requests),
                "operations": _nested(stats.operations),
                "watch": dict(stats.watch),
                "faults": dict(injector.injected),
                "faults_skipped": dict(injector.skipped),
                "fault_log": injector.log,
                "lost_writes": sum(1 for t in stats.violations if t.startswith("lost write"))
                + len(outcome.checks.get("every write that returned OK is in the cluster", [])),
                "objects": _object_counts(workers),
                "relay": {"connections": replicas.relay.connections, "open_at_end": relay_open},
                "processes": [_process_row(t) for t in procs.tracked.values()],
            }
        )
    finally:
        injector.stop()
        sampler.cancel()
        for task in tasks.values():
            task.cancel()
        pending = [sampler, *tasks.values()]
        _, stuck = await asyncio.wait(pending, timeout=30)
        if stuck:  # reported, never waited for forever
            outcome.fail("clients stop when told", ", ".join(sorted(t.get_name() for t in stuck)))
        await replicas.stop()


async def _guard(work: Any, stats: Stats, name: str) -> None:
    """Run a client or the injector; an exception it did not expect is a finding, not a crash."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception("%s failed", name)
        stats.unexpected_error(name, exc)


async def _sample(
    procs: ProcessWatch, replicas: HubReplicas, control_planes: dict[str, ControlPlane]
) -> None:
    procs.see(os.getpid(), "driver", "soak-driver")
    while True:
        chisels = by_parent("chisel")
        for index, hub in list(replicas.hubs.items()):
            if hub.alive():
                procs.see(hub.pid, "hub", f"hub-{index}")
                for pid in chisels.get(hub.pid, []):
                    procs.see(pid, "hub-chisel", f"hub-{index}/chisel")
        for name, agent in list(replicas.agents.items()):
            if agent.alive():
                procs.see(agent.pid, "agent", f"agent-{name}")
                for pid in chisels.get(agent.pid, []):
                    procs.see(pid, "agent-chisel", f"agent-{name}/chisel")
        for cp in {id(cp): cp for cp in control_planes.values()}.values():
            for process in list(cp.processes):
                if process.alive():
                    kind = process.name.split("/")[-1]
                    procs.see(process.pid, kind, process.name)
        procs.sample()
        await asyncio.sleep(1.0)


async def _restore(replicas: HubReplicas) -> None:
    for index in range(REPLICAS):
        if index not in replicas.hubs or not replicas.hubs[index].alive():
            replicas.start_hub(index)
    for name in replicas.clusters:
        if name not in replicas.agents or not replicas.agents[name].alive():
            replicas.start_agent(name)


async def _until(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.5)


async def _recovered(replicas: HubReplicas, token: str, namespaces: dict[str, str]) -> bool:
    """A leader with every agent connected, and a List in every cluster through every replica."""
    if not await replicas.all_connected():
        return False
    transport = HTTPTransport(http_version=HTTPVersion.HTTP1, connect_timeout=1.0)
    try:
        for index in range(REPLICAS):
            client = ResourceServiceClient(
                replicas.url(index), http_client=Client(transport), timeout_ms=5000
            )
            for cluster, namespace in namespaces.items():
                request = pb.ListRequest(
                    cluster=cluster, version="v1", resource="configmaps", namespace=namespace
                )
                await client.list(request, headers={"authorization": f"Bearer {token}"})
    except ConnectError:
        return False
    finally:
        await transport.aclose()
    return True


def _truth(cp: ControlPlane, namespace: str) -> dict[str, str | None]:
    """The namespace's soak objects as kube-apiserver has them (read as admin): name -> data.v."""
    items = cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps?labelSelector=soak%3D1")["items"]
    return {item["metadata"]["name"]: (item.get("data") or {}).get("v") for item in items}


async def _converged(watcher: Watcher, truth: dict[str, str | None]) -> bool:
    return watcher.view == truth


def _diff(view: dict[str, str | None], truth: dict[str, str | None]) -> dict[str, Any]:
    keys = sorted(set(view) | set(truth))
    return {
        k: {"watch": view.get(k, "<absent>"), "cluster": truth.get(k, "<absent>")}
        for k in keys
        if view.get(k, "<absent>") != truth.get(k, "<absent>")
    }


def _check_model(workers: list[Worker], truth: dict[str, dict[str, str | None]], outcome: Outcome) -> None:
    for worker in workers:
        for (cluster, name), expected in worker.objects.items():
            actual = truth[cluster].get(name)
            if expected.value == UNKNOWN:
                continue
            if expected.value is None and name in truth[cluster]:
                outcome.fail(
                    "every delete that returned OK stayed deleted",
                    f"{cluster}/{name} exists with v={actual} after {expected.last}",
                )
            elif expected.value is not None and actual != expected.value:
                outcome.fail(
                    "every write that returned OK is in the cluster",
                    f"{cluster}/{name}: cluster has v={actual if name in truth[cluster] else '<absent>'} "
                    f"after {expected.last}",
                )


async def _quiesce(procs: ProcessWatch) -> None:
    previous: dict[int, int] = {}
    for _ in range(15):
        await asyncio.sleep(1.0)
        now = {pid: s.fds for pid in procs.tracked if (s := read(pid)) is not None}
        if now == previous:
            return
        previous = now


def _check_processes(procs: ProcessWatch, args: argparse.Namespace, outcome: Outcome) -> None:
    compared = 0
    longest: dict[str, float] = {}
    for item in procs.tracked.values():
        if item.kind not in CHECKED_KINDS or item.baseline is None or item.end is None:
            continue
        compared += 1
        growth = item.end.rss_mib - item.baseline.rss_mib
        if growth > args.max_rss_growth_mib:
            outcome.fail(
                "no process leaked memory",
                f"{item.label} (pid {item.pid}): RSS "
                f"{item.baseline.rss_mib:.0f} -> {item.end.rss_mib:.0f} MiB",
            )
        if item.end.fds > item.baseline_fds + args.fd_slack:
            outcome.fail(
                "no process leaked file descriptors",
                f"{item.label} (pid {item.pid}): fds {item.baseline_fds} -> {item.end.fds}",
            )
            outcome.data.setdefault("leaked_fds", {})[item.label] = describe_fds(item.pid)
        window = item.end.at - item.baseline.at
        longest[item.kind] = max(longest.get(item.kind, 0.0), round(window, 1))
    outcome.data["processes_compared"] = compared
    outcome.data["longest_checked_window_seconds"] = longest
    if compared == 0:
        outcome.fail("no process leaked memory", "no process of ours lived from its baseline to the end")


def _process_row(item: Tracked) -> dict[str, Any]:
    return {
        "process": item.label,
        "kind": item.kind,
        "pid": item.pid,
        "rss_mib_start": round(item.baseline.rss_mib, 1) if item.baseline else None,
        "rss_mib_end": round(item.end.rss_mib, 1) if item.end else None,
        "rss_mib_peak": round(item.peak_rss_mib, 1),
        "fds_start": item.baseline_fds if item.baseline else None,
        "fds_end": item.end.fds if item.end else None,
        "window_seconds": round(item.end.at - item.baseline.at, 1) if item.baseline and item.end else None,
        "checked": item.kind in CHECKED_KINDS and item.baseline is not None and item.end is not None,
    }


def _nested(counter: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (rpc, outcome), count in sorted(counter.items()):
        out.setdefault(rpc, {})[outcome] = count
    return out


def _object_counts(workers: list[Worker]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for worker in workers:
        for expected in worker.objects.values():
            counts[
                "unknown" if expected.value == UNKNOWN else "absent" if expected.value is None else "present"
            ] += 1
    return dict(counts)


def _write(results: Path, outcome: Outcome) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = results / f"soak-{stamp}.json"
    document = {
        "passed": outcome.passed,
        "seed": outcome.seed,
        "duration": outcome.duration,
        "started_at": outcome.started_at,
        "failed_checks": {k: v for k, v in outcome.checks.items() if v},
        **outcome.data,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def _print_summary(outcome: Outcome, path: Path) -> None:
    data = outcome.data
    lines = [
        "",
        "=" * 78,
        f"SOAK {'PASSED' if outcome.passed else 'FAILED'}  seed {outcome.seed}  "
        f"traffic {data.get('traffic_seconds', '?')}s (faults {data.get('fault_seconds', '?')}s)  "
        f"setup {data.get('setup_seconds', '?')}s  recovery {data.get('recovery_seconds', '?')}s",
        "requests (attempts) by RPC and code:",
    ]
    for rpc, codes in data.get("requests", {}).items():
        lines.append(f"  {rpc:7} " + "  ".join(f"{code}={n}" for code, n in codes.items()))
    lines.append("operations by RPC and result:")
    for rpc, results in data.get("operations", {}).items():
        lines.append(f"  {rpc:7} " + "  ".join(f"{result}={n}" for result, n in results.items()))
    lines.append(f"watch: {data.get('watch', {})}")
    lines.append(f"faults injected: {data.get('faults', {})}  (skipped: {data.get('faults_skipped', {})})")
    lines.append(
        f"objects at the end: {data.get('objects', {})}   lost writes: {data.get('lost_writes', '?')}"
    )
    lines.append(f"relay: {data.get('relay', {})}")
    lines.append(
        f"longest baseline-to-end window checked, by kind: {data.get('longest_checked_window_seconds')}"
    )
    lines.append(
        "processes alive at the end (RSS MiB, fds: baseline -> end; * = checked, "
        f"{data.get('processes_compared', 0)} compared):"
    )
    for row in data.get("processes", []):
        if row["rss_mib_end"] is None:
            continue  # killed by a fault (the JSON has every incarnation)
        lines.append(
            f"  {'*' if row['checked'] else ' '} {row['process']:24} "
            f"rss {row['rss_mib_start']} -> {row['rss_mib_end']} (peak {row['rss_mib_peak']})  "
            f"fds {row['fds_start']} -> {row['fds_end']}  over {row['window_seconds']}s"
        )
    for label, kinds in data.get("leaked_fds", {}).items():
        lines.append(f"fds of {label} at the end: {kinds}")
    for check, texts in outcome.checks.items():
        for text in texts[:20]:
            lines.append(f"FAILED {check}: {text}")
        if len(texts) > 20:
            lines.append(f"FAILED {check}: ... and {len(texts) - 20} more")
    lines.append(f"summary: {path}")
    if not outcome.passed:
        lines.append(f"logs kept in {data.get('logs')}")
    lines.append("=" * 78)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
