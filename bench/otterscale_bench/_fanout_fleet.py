"""The fan-out benchmark's fleets (issue 18): which processes run, where, and how they start.

**Real fleet**: ``fleet_clusters`` real agents with real chisel tunnels over ``planes`` control
planes. Clusters share control planes (several agents with different cluster names point at one
kube-apiserver): that exercises the hub, tunnel and agent paths fully while keeping 50 clusters
in memory. Cluster ``h00`` has a control plane to itself (the fairness row's firehose); the
others are spread over the remaining planes. The black-holed cluster's (``c01``) tunnel goes
through a :class:`~otterscale.testing.BlackHoleRelay`.

**Stub fleet**: a hub with ``stub_clusters`` clusters, each a real chisel client forwarding its
tunnel port to a stub process (one per :data:`CLUSTERS_PER_STUB`) that replays a real agent's
recorded answers (:mod:`._stub`):
1,000 real agents (~90 MB each) do not fit on the benchmark machine, and these rows measure the
hub. The report labels them "stub agents".
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from otterscale.resource.v1.multicluster_pb2 import ClusterStatus
from otterscale.testing import (
    BlackHoleRelay,
    ControlPlane,
    LocalIssuer,
    ManagedProcess,
    System,
    free_port,
    start_control_plane,
    tool_path,
)

from ._kube import KubeDirect
from ._procs import ProcessSet, child_pid

logger = logging.getLogger(__name__)

OK = ClusterStatus.OUTCOME_OK
SYNCED = ClusterStatus.OUTCOME_SYNCED
LIST_NAMESPACE = "otterscale-bench-fanout"
WATCH_NAMESPACE = "otterscale-bench-fanout-watch"
WATCH_LABEL = "otterscale-bench=fanout-watch"
HOT = "h00"
HOLE = "c01"
SUBJECT = "otterscale-bench"
AUDIENCE = "otterscale"
BENCH_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FanoutSizes:
    """How much of everything the fan-out rows do."""

    planes: int
    fleet_clusters: int
    list_clusters: int
    list_items: int
    list_repeats: int
    page_limit: int
    hole_timeout: float
    watch_rate: float
    watch_seconds: float
    hot_rate: float
    quiet_rate: float
    fair_seconds: float
    stub_clusters: int
    stub_items: int
    stub_hold_seconds: float


FANOUT_FULL = FanoutSizes(
    planes=5,
    fleet_clusters=50,
    list_clusters=20,
    list_items=1000,
    list_repeats=15,
    page_limit=500,
    hole_timeout=2.0,
    watch_rate=200.0,
    watch_seconds=20.0,
    hot_rate=1000.0,
    quiet_rate=1.0,
    fair_seconds=20.0,
    stub_clusters=1000,
    stub_items=10,
    stub_hold_seconds=20.0,
)
FANOUT_SMOKE = FanoutSizes(
    # Two: the fairness row needs quiet clusters on a plane of their own (on one plane every
    # cluster sees the hot writes and the quiet clusters have nothing to measure).
    planes=2,
    fleet_clusters=4,
    list_clusters=3,
    list_items=30,
    list_repeats=2,
    page_limit=20,
    hole_timeout=1.0,
    watch_rate=20.0,
    watch_seconds=3.0,
    hot_rate=40.0,
    quiet_rate=1.0,
    fair_seconds=3.0,
    stub_clusters=10,
    stub_items=10,
    stub_hold_seconds=2.0,
)


# --------------------------------------------------------------------------------------------------
# The real fleet


@dataclass
class RealFleet:
    system: System
    planes: list[ControlPlane]
    kubes: list[KubeDirect]
    placement: dict[str, int]  # cluster -> plane index
    relay: BlackHoleRelay | None
    procs: ProcessSet

    def clusters_on(self, plane: int) -> list[str]:
        return [name for name, index in self.placement.items() if index == plane]


#: Objects the firehose writes round-robin: concurrent patches of one object conflict and retry in
#: kube-apiserver, which would measure etcd contention instead of the hub.
HOT_OBJECTS = 200


def hot_names(count: int = HOT_OBJECTS) -> list[str]:
    """The names of the firehose cluster's objects (on plane 0)."""
    return [f"hot-{i:03d}" for i in range(count)]


def placement(sizes: FanoutSizes) -> dict[str, int]:
    """``h00`` alone on plane 0; the others round-robin over the remaining planes."""
    others = max(1, sizes.planes - 1)
    found = {HOT: 0}
    for i in range(1, sizes.fleet_clusters):
        found[f"c{i:02d}"] = 1 + (i - 1) % others if sizes.planes > 1 else 0
    return found


async def _prepare_plane(
    kube: KubeDirect, cp: ControlPlane, sizes: FanoutSizes, index: int, hot_objects: int
) -> None:
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "otterscale-bench-fanout"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": SUBJECT}],
        }
    )
    await kube.ensure_namespace(LIST_NAMESPACE)
    await kube.ensure_namespace(WATCH_NAMESPACE)
    await kube.create_configmaps(
        LIST_NAMESPACE,
        [f"cm-{i:05d}" for i in range(sizes.list_items)],
        lambda _: {"payload": secrets.token_hex(400)},
    )
    count = await kube.count(f"/api/v1/namespaces/{LIST_NAMESPACE}/configmaps")
    if count != sizes.list_items:
        raise RuntimeError(f"plane {index} has {count} ConfigMaps, expected {sizes.list_items}")
    names = hot_names(hot_objects) if index == 0 else ["fw"]
    for name in names:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"otterscale-bench": "fanout-watch"}},
            "data": {"ts": "0"},
        }
        await kube.request("POST", f"/api/v1/namespaces/{WATCH_NAMESPACE}/configmaps", body, ok=(201, 409))


async def start_real_fleet(
    work: Path, first_plane: ControlPlane, issuer: LocalIssuer, sizes: FanoutSizes, log_level: str
) -> RealFleet:
    planes = [first_plane]
    for i in range(1, sizes.planes):
        logger.info("fanout: starting control plane %d of %d", i + 1, sizes.planes)
        # On the main thread (blocking the loop a moment): a child process dies with the thread
        # that spawned it (otterscale.testing's parent-death signal).
        planes.append(start_control_plane(f"fan{i}", work / f"plane-{i}"))
    kubes = [KubeDirect(cp) for cp in planes]
    for i, (kube, cp) in enumerate(zip(kubes, planes, strict=True)):
        await _prepare_plane(kube, cp, sizes, i, hot_objects=HOT_OBJECTS)
    where = placement(sizes)
    (work / "system").mkdir(parents=True, exist_ok=True)
    system = System(
        work / "system",
        issuer.url,
        AUDIENCE,
        None,
        log_level=log_level,
        extra_config={
            "limits": {"max_watches_per_subject": 1000},
            "fanout": {"max_inflight_per_cluster": 64, "max_legs_per_subject": 100_000},
        },
    )
    for name, index in where.items():
        system.add_cluster(name, planes[index])
    system.start_hub()
    relay = BlackHoleRelay(("127.0.0.1", system.tunnel_port)).start()
    try:
        for n, name in enumerate(where, 1):
            system.start_agent(name, tunnel_server_url=relay.url if name == HOLE else None)
            if n % 10 == 0:
                logger.info("fanout: %d of %d agents connected", n, len(where))
    except BaseException:
        system.stop()
        relay.close()
        raise
    assert system.hub is not None
    procs = ProcessSet({"hub": system.hub.pid, "chisel-server": child_pid(system.hub.pid, "chisel")})
    return RealFleet(system, planes, kubes, where, relay, procs)


async def stop_real_fleet(fleet: RealFleet) -> None:
    fleet.system.stop()
    if fleet.relay is not None:
        fleet.relay.close()
    for kube in fleet.kubes:
        await kube.aclose()
    for cp in fleet.planes[1:]:
        cp.stop()


# --------------------------------------------------------------------------------------------------
# The stub fleet: the hub alone at scale


@dataclass
class StubFleet:
    system: System
    stubs: list[ManagedProcess]
    tunnels: list[ManagedProcess]
    procs: ProcessSet


#: Clusters per stub process. The hub pings every agent every few seconds, all at once; a real
#: fleet answers those from as many processes, one stub process answering 1,000 within the
#: probe's 2 s on a loaded 2-core machine would make the hub mark clusters disconnected.
CLUSTERS_PER_STUB = 100


def _connected_count(system: System) -> int:
    return sum(1 for up in system.connected().values() if up)


def start_stub_fleet(
    work: Path, issuer: LocalIssuer, sizes: FanoutSizes, items: bytes, log_level: str
) -> StubFleet:
    """A hub with ``stub_clusters`` clusters, each a real chisel client to one replaying stub."""
    work.mkdir(parents=True, exist_ok=True)
    n = sizes.stub_clusters
    (work / "system").mkdir(parents=True, exist_ok=True)
    system = System(
        work / "system",
        issuer.url,
        AUDIENCE,
        None,
        log_level=log_level,
        extra_config={
            "fanout": {
                "max_clusters_per_call": max(1000, n),
                "max_legs_per_subject": 100_000,
                "max_inflight_per_cluster": 8,
                "max_concurrency": max(128, n),
                "max_page_items": max(100_000, 100 * n),
            },
        },
    )
    for i in range(n):
        system.add_cluster(f"s{i:04d}", None)
    system.start_hub()
    assert system.hub is not None
    assert system.fingerprint is not None
    items_file = work / "recorded-list.bin"
    items_file.write_bytes(items)
    stubs: list[ManagedProcess] = []
    tunnels: list[ManagedProcess] = []
    try:
        ports = []
        for k in range(max(1, -(-n // CLUSTERS_PER_STUB))):
            port = free_port()
            ports.append(port)
            stubs.append(
                ManagedProcess(
                    f"stub-agent-{k}",
                    [
                        sys.executable,
                        "-m",
                        "otterscale_bench._stub",
                        "--port",
                        str(port),
                        "--items",
                        str(items_file),
                    ],
                    work / f"stub-agent-{k}.log",
                    env={**os.environ, "PYTHONPATH": str(BENCH_DIR)},
                )
            )
        for stub, port in zip(stubs, ports, strict=True):
            stub.wait_until(lambda port=port: _port_open(port), timeout=60, what="listening")
        chisel = str(tool_path("chisel"))
        logs = work / "chisel-clients"
        logs.mkdir(exist_ok=True)
        for i, entry in enumerate(system.clusters.values()):
            tunnels.append(
                ManagedProcess(
                    f"chisel-{entry.name}",
                    [
                        chisel,
                        "client",
                        "--fingerprint",
                        system.fingerprint,
                        "--keepalive",
                        "25s",
                        "--max-retry-interval",
                        "2s",
                        system.tunnel_url,
                        f"R:127.0.0.1:{entry.tunnel_port}:127.0.0.1:{ports[i % len(ports)]}",
                    ],
                    logs / f"{entry.name}.log",
                    env={"AUTH": f"{entry.user}:{entry.password}", "PATH": os.environ.get("PATH", "")},
                )
            )
        system.hub.wait_until(
            lambda: _connected_count(system) >= n, timeout=600, what=f"reporting {n} clusters connected"
        )
    except BaseException:
        _stop_all(tunnels)
        _stop_all(stubs)
        system.stop()
        raise
    procs = ProcessSet({"hub": system.hub.pid, "chisel-server": child_pid(system.hub.pid, "chisel")})
    return StubFleet(system, stubs, tunnels, procs)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _stop_all(processes: Sequence[ManagedProcess]) -> None:
    for proc in processes:
        proc.signal(signal.SIGTERM)
    for proc in processes:
        proc.stop(timeout=5)


def stop_stub_fleet(fleet: StubFleet) -> None:
    _stop_all(fleet.tunnels)
    _stop_all(fleet.stubs)
    fleet.system.stop()
