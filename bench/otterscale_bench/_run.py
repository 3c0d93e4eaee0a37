"""``python bench/run.py [--smoke]``: start everything, run every scenario, write the report.

Order matters: the idle cost is measured first, on a fresh hub with ``idle_clusters``
configured and ``idle_connected`` agents (all agents share the one control plane); then every
agent but the first is stopped and the load scenarios run against that one (latency,
throughput, lists, Watch last since 1,000 streams leave the most behind). Profiles (py-spy) are
taken in extra runs after each measured one, never during it. Once the hub and agents are
stopped, ``kubeclient`` measures the agent's HTTP client alone against the same control plane
(``_kubeclient``), and ``fanout`` starts its own fleets.

Every process is started through ``otterscale.testing`` (``ManagedProcess``: own process group,
parent-death signal, escalating stop) and stopped in ``finally``. The working directory (cluster
data, every process's log) is deleted after a clean run and kept after a failure. The
``kubeclient`` workers are the exception: they are spoken to over their stdin and stdout, run in
their own process group, end when their stdin closes (so with the benchmark) and are killed
with their group if they do not exit when asked.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from otterscale.common import Identity, OtterscaleConfig, derive_identity_key
from otterscale.testing import ControlPlane, LocalIssuer, System, start_control_plane

from . import _fanout, _kubeclient, _report, _runtime, _scenarios
from ._kube import KubeDirect
from ._paths import Endpoints
from ._procs import ProcessSet, child_pid, envoy_of
from ._scenarios import FULL, SMOKE, Bench, Sizes

logger = logging.getLogger("otterscale_bench")

ROOT = Path(__file__).resolve().parents[2]
CLIENT_ID = "otterscale"
BENCH_IDENTITY = Identity("otterscale-bench", ("otterscale-bench",))
SCENARIOS = ("startup", "idle", "latency", "throughput", "lists", "watch", "kubeclient", "fanout")
#: Scenarios that measure the hub and agents (the others start what they need themselves).
ON_SYSTEM = {"startup", "idle", "latency", "throughput", "lists", "watch"}
#: Opt-in (``--only runtime``): needs the real test node (root, the node tools, the python image
#: of ``nox -s images``) and starts its own node, hub and agent (see ``_runtime``).
RUNTIME = "runtime"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nox -s bench --",
        description="OtterScale benchmark: direct kube-apiserver vs agent vs hub, with real components.",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): about a minute")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "results", help="results folder (default results/)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=(*SCENARIOS, RUNTIME),
        help="run only these scenarios (repeatable); `runtime` (exec, logs, port-forward on the test "
        "node: needs root) runs only when named",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument(
        "--baseline",
        metavar="OTTERSCALE",
        type=Path,
        help="the `otterscale` command of another tree (e.g. main's, installed in a venv of its own): "
        "every scenario runs against it first, then against this tree, with the same control plane "
        "and client (a before/after table; no profiles of the baseline)",
    )
    parser.add_argument(
        "--service-log-level",
        choices=("debug", "info"),
        default="info",
        help="log level of hub and agents (default info, as deployed; the test harness uses debug)",
    )
    parser.add_argument(
        "--keep-work", action="store_true", help="keep cluster data and logs after a clean run"
    )
    parser.add_argument("--watch-streams", type=int, help="concurrent Watch streams (default 1000; smoke 10)")
    parser.add_argument("--watch-rate", type=float, help="object changes per second (default 200; smoke 20)")
    parser.add_argument("--watch-seconds", type=float, help="measured Watch window (default 30; smoke 3)")
    parser.add_argument(
        "--watch-streams-per-connection",
        type=int,
        help="Watch streams per client HTTP/2 connection to the hub (default 250)",
    )
    parser.add_argument(
        "--idle-clusters", type=int, help="clusters configured in the hub (default 50; smoke 3)"
    )
    parser.add_argument(
        "--idle-connected", type=int, help="of them with a running agent (default 10; smoke 2)"
    )
    parser.add_argument("--latency-requests", type=int, help="sequential Gets per variant (default 2000)")
    parser.add_argument("--throughput-seconds", type=float, help="measured seconds per point (default 8)")
    return parser


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = SMOKE if args.smoke else FULL
    overrides: dict[str, Any] = {
        "watch_streams": args.watch_streams,
        "watch_rate": args.watch_rate,
        "watch_seconds": args.watch_seconds,
        "watch_streams_per_connection": args.watch_streams_per_connection,
        "idle_clusters": args.idle_clusters,
        "idle_connected": args.idle_connected,
        "latency_requests": args.latency_requests,
        "throughput_seconds": args.throughput_seconds,
    }
    if args.no_profile:
        overrides["profile"] = False
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if not 1 <= sizes.idle_connected <= sizes.idle_clusters:
        raise SystemExit("--idle-connected must be between 1 and --idle-clusters")
    return sizes


def _raise_file_limit() -> None:
    """Children inherit it: the agent holds one connection per Watch to kube-apiserver."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _allow_deep_messages() -> None:
    # Deep objects (CRDs, inlined schemas) nest past upb's default limit of 100 levels.
    from google._upb import _message  # type: ignore[import-untyped]

    _message.SetAllowOversizeProtos(True)


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except (OSError, ValueError):
        pass
    versions: dict[str, str | None] = {}
    for dist in (
        "otterscale-hub",
        "otterscale-agent",
        "connectrpc",
        "pyqwest",
        "hypercorn",
        "protobuf",
        "aiohttp",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
        "versions": versions,
        "git": _git(),
    }


def _git() -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "packages"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


#: Watch slots beyond the scenario's streams (the per-subject limit counts every open Watch).
WATCH_LIMIT_MARGIN = 100


class _BenchSystem(System):
    """The test harness's system, with the hub's per-subject Watch limit raised: the Watch
    scenario opens all its streams with one token (one subject). ``command`` runs another tree's
    ``otterscale`` (a baseline, whose hub serves its metrics on its API address)."""

    def __init__(self, *args: Any, max_watches: int, command: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_watches = max_watches
        if command is not None:
            self.command = [str(command)]
            self.separate_management = False

    def config(self) -> dict[str, Any]:
        document = super().config()
        if "limits" in OtterscaleConfig.model_fields:  # hubs without the section have no limit
            document["limits"] = {
                "max_watches_per_subject": max(self.max_watches, 1000),
            }
        return document


def _start_system(
    directory: Path,
    clusters: dict[str, ControlPlane | None],
    *,
    realm_url: str,
    log_level: str,
    max_watches: int,
    command: Path | None = None,
) -> System:
    """``otterscale.testing.start_system`` with :class:`_BenchSystem`."""
    directory.mkdir(parents=True, exist_ok=True)
    system = _BenchSystem(
        directory, realm_url, CLIENT_ID, None, log_level=log_level, max_watches=max_watches, command=command
    )
    for name, cp in clusters.items():
        system.add_cluster(name, cp)
    try:
        system.start_hub()
        for name, cp in clusters.items():
            if cp is not None:
                system.start_agent(name)
    except BaseException:
        system.stop()
        raise
    return system


def _process_set(system: System, cp: ControlPlane, cluster: str) -> ProcessSet:
    assert system.hub is not None
    hub = system.hub.pid
    agent = system.agents[cluster].pid
    # Inside Envoy, the service is the Envoy process and the command that started it its launcher.
    hub_envoy, agent_envoy = envoy_of(hub), envoy_of(agent)

    def of(suffix: str) -> int:
        return next(p.pid for p in cp.processes if p.name.endswith(suffix))

    return ProcessSet(
        {
            "hub": hub_envoy or hub,
            "hub-launcher": hub if hub_envoy else None,
            "chisel-server": child_pid(hub, "chisel"),
            "agent": agent_envoy or agent,
            "agent-launcher": agent if agent_envoy else None,
            "chisel-client": child_pid(agent, "chisel"),
            "kube-apiserver": of("/kube-apiserver"),
            "etcd": of("/etcd"),
            _scenarios.CLIENT: os.getpid(),
        }
    )


async def _run_scenarios(
    system: System,
    cp: ControlPlane,
    issuer: LocalIssuer,
    sizes: Sizes,
    out: Path,
    only: set[str],
    results: dict[str, Any],
) -> list[str]:
    cluster = "c00"
    entry = system.clusters[cluster]
    kube = KubeDirect(cp)
    ep = Endpoints(
        cluster=cluster,
        hub_url=system.hub_url,
        agent_url=f"http://127.0.0.1:{entry.api_port}",
        tunnel_url=f"http://127.0.0.1:{entry.tunnel_port}",
        token=issuer.token(BENCH_IDENTITY.subject, BENCH_IDENTITY.groups, audience=CLIENT_ID),
        identity=BENCH_IDENTITY,
        identity_key=derive_identity_key(cluster, entry.password),
        kube=kube,
    )
    b = Bench(ep=ep, procs=_process_set(system, cp, cluster), system=system, cp=cp, sizes=sizes, out=out)
    profiles: list[dict[str, Any]] = []
    results["profiles"] = profiles
    try:
        if "startup" in only:
            results["startup"] = await _scenarios.startup(b, sizes.startup_repeats)
        if "idle" in only:
            logger.info(
                "idle: %d clusters configured, %d connected", sizes.idle_clusters, sizes.idle_connected
            )
            results["idle"] = await _scenarios.idle(b, sizes.idle_clusters, sizes.idle_connected)
        for name in list(system.agents):
            if name != cluster:
                await asyncio.to_thread(system.stop_agent, name)
        await _scenarios.prepare(b)
        if "latency" in only:
            results["latency"] = await _scenarios.latency(b)
        if "throughput" in only:
            results["throughput"] = await _scenarios.throughput(b)
            if sizes.profile:
                profiles += await _scenarios.profile_get_load(b)
        if "lists" in only:
            results["list_setup_seconds"] = await _scenarios.prepare_lists(b)
            results["lists"] = await _scenarios.lists(b)
            if sizes.profile:
                profiles += await _scenarios.profile_list(b)
        if "watch" in only:
            results["watch"] = await _scenarios.watch(b)
            profiles += results["watch"].pop("profiles", [])
    finally:
        await kube.aclose()
    return b.failures


def _run_shared(
    args: argparse.Namespace,
    sizes: Sizes,
    only: set[str],
    work: Path,
    out: Path,
    results: dict[str, Any],
    stoppers: list[Any],
) -> list[str]:
    """The scenarios on the shared control plane, hub and agents (stopped by the caller)."""
    # Services run at `info` as deployed: at debug the HTTP/2 libraries' frame logging would
    # dominate their CPU (see the README's Performance section).
    results["service_log_level"] = args.service_log_level
    t = time.monotonic()
    logger.info("starting a control plane (etcd, kube-apiserver, kube-controller-manager)")
    cp = start_control_plane("bench", work / "cluster")
    stoppers.append(cp)
    results["timings"]["control_plane_start"] = round(time.monotonic() - t, 2)
    issuer = LocalIssuer().start()
    stoppers.append(issuer)
    configured = sizes.idle_clusters if "idle" in only else 1
    connected = sizes.idle_connected if "idle" in only else 1
    clusters = {f"c{i:02d}": (cp if i < connected else None) for i in range(configured)}
    runs: list[tuple[str, Path | None, dict[str, Any]]] = []
    if args.baseline is not None:
        baseline: dict[str, Any] = {"label": str(args.baseline), "timings": {}}
        results["baseline"] = baseline
        runs.append(("baseline", args.baseline, baseline))
    runs.append(("this tree", None, results))
    failures: list[str] = []
    for label, command, target in runs if only & ON_SYSTEM else ():
        t = time.monotonic()
        logger.info(
            "%s: starting the hub and %d agents (%d clusters configured)", label, connected, configured
        )
        system = _start_system(
            work / ("system-baseline" if command else "system"),
            clusters,
            realm_url=issuer.url,
            log_level=args.service_log_level,
            max_watches=sizes.watch_streams + WATCH_LIMIT_MARGIN,
            command=command,
        )
        stoppers.append(system)
        target.setdefault("timings", {})["system_start"] = round(time.monotonic() - t, 2)
        run_sizes = dataclasses.replace(sizes, profile=False) if command else sizes
        try:
            failures += asyncio.run(_run_scenarios(system, cp, issuer, run_sizes, out, only, target))
        finally:
            # Each tree's system is done before the next starts (and before fan-out's fleets).
            stoppers.remove(system)
            system.stop()
    if "baseline" in results:
        results["baseline"]["targets"] = _report.targets(results["baseline"])
    if "kubeclient" in only:
        # The agent's HTTP client alone against kube-apiserver (no hub, no agent running).
        t = time.monotonic()
        kubeclient_sizes = _kubeclient.SMOKE if args.smoke else _kubeclient.FULL
        logger.info("kubeclient: %s", kubeclient_sizes)
        results["kubeclient"] = asyncio.run(
            _kubeclient.run(work / "kubeclient", cp, BENCH_IDENTITY, kubeclient_sizes, failures)
        )
        results["timings"]["kubeclient"] = round(time.monotonic() - t, 1)
    if "fanout" in only:
        # Its own fleets (and hubs).
        t = time.monotonic()
        fanout_sizes = _fanout.FANOUT_SMOKE if args.smoke else _fanout.FANOUT_FULL
        logger.info("fanout: %s", fanout_sizes)
        results["fanout"] = {}
        asyncio.run(
            _fanout.run(
                work / "fanout", cp, issuer, fanout_sizes, args.service_log_level, failures, results["fanout"]
            )
        )
        results["timings"]["fanout"] = round(time.monotonic() - t, 1)
    return failures


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = _sizes(args)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    _raise_file_limit()
    _allow_deep_messages()
    only = set(args.only or SCENARIOS)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out / f"bench-{stamp}{'-smoke' if args.smoke else ''}").resolve()
    out.mkdir(parents=True, exist_ok=False)
    work = out / "work"
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "smoke": args.smoke,
        "sizes": dataclasses.asdict(sizes),
        "machine": _machine(),
        "timings": {},
    }
    failures: list[str] = []
    stoppers: list[Any] = []  # system, issuer, control plane: stopped in reverse order of start
    try:
        if RUNTIME in only:
            t = time.monotonic()
            logger.info("runtime scenario: starting the test node, a hub and an agent")
            runtime_sizes = _runtime.SMOKE if args.smoke else _runtime.FULL
            results["runtime"] = _runtime.run(work / "runtime", runtime_sizes)
            results["runtime_targets"] = _runtime.targets(results["runtime"])
            results["timings"]["runtime"] = round(time.monotonic() - t, 1)
            only.discard(RUNTIME)
        if only:
            failures = _run_shared(args, sizes, only, work, out, results, stoppers)
    except BaseException as exc:
        failures.append(f"the benchmark itself failed: {type(exc).__name__}: {exc}")
        logger.error("benchmark failed:\n%s", traceback.format_exc())
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        for closer in reversed(stoppers):
            try:
                closer.stop()
            except Exception:
                logger.exception("stopping %r failed", closer)
        results["timings"]["total"] = round(time.monotonic() - started, 1)
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        results["failures"] = failures
        results["targets"] = _report.targets(results)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        try:
            _report.write(results, out)
        except Exception:
            logger.exception("writing the report failed")
            failures.append("writing the report failed")
        if failures or args.keep_work:
            logger.info("working directory (cluster data, logs) kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(_report.summary_table(results), flush=True)
    for target, met in results.get("runtime_targets", {}).items():
        print(f"runtime: {target:<36} {'met' if met else 'MISSED'}", flush=True)
    print(f"\nresults: {out}/results.json\nreport:  {out}/report.md", flush=True)
    if failures:
        print("\nFUNCTIONAL FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr, flush=True)
        return 1
    return 0
