"""Both charts installed with helm on the real node, and used through the hub's Service.

The images of ``nox -s images`` run as Pods on the session's node (``_node``), installed the
operator's way (``_nodesystem``): the hub in namespace ``otterscale``; an agent in the node's own
cluster (``home``, in-cluster credentials and the chart's RBAC); and agents for two more clusters
(``east`` and ``west``: control planes of the ``control_plane_factory`` fixture on the host), which
run on the node with a kubeconfig Secret and reach their API servers through the host's end of the
veth. The issuer is the local test issuer, bound there too.

In order (one installation, each test builds on the previous one): one replica with every Pod
Ready through its probes and every protocol through the Service; three replicas with leader
election, one leader label and a tunnel Service that selects only the leader, Get and Watch
through it; the leader Pod killed and a new leader labelled, timed; the leader's container
crashed (SIGKILL, no hand-over) and a follower taking over when the Lease expires, timed; a
changed value rolled out by helm upgrade; helm uninstall leaving nothing of the releases behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane, KubeAPIError, LocalIssuer, Node, NodeError
from otterscale.testing._nodesystem import AGENT_RELEASE, HUB_RELEASE, NAMESPACE, Installation

pytestmark = [pytest.mark.integration, pytest.mark.node, pytest.mark.ha]

CLUSTERS = ("home", "east", "west")
READER_GROUP = "otterscale-readers"
TRANSPORTS = {
    "connect-json": (ProtocolType.CONNECT, HTTPVersion.HTTP1, True),
    "connect-proto": (ProtocolType.CONNECT, HTTPVersion.HTTP2, False),
    "grpc": (ProtocolType.GRPC, HTTPVersion.HTTP2, False),
    "grpc-web": (ProtocolType.GRPC_WEB, HTTPVersion.HTTP1, False),
}
#: Measured numbers, printed at the end of the module (and kept in <basetemp>/node-charts.json).
MEASURED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def issuer(node: Node) -> Iterator[LocalIssuer]:
    found = LocalIssuer(host=node.host_ip).start()
    yield found
    found.stop()


def _grant_read(cp: ControlPlane) -> None:
    """The readers group may read namespaces and configmaps (the agent impersonates the caller)."""
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "node-charts-reader"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["namespaces", "configmaps"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        }
    )
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "node-charts-reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "node-charts-reader",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": READER_GROUP}],
        }
    )


@pytest.fixture(scope="module")
def installation(
    node: Node,
    issuer: LocalIssuer,
    control_plane_factory: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installation]:
    clusters: dict[str, ControlPlane | None] = {"home": None}
    clusters.update({name: control_plane_factory(f"charts-{name}") for name in ("east", "west")})
    found = Installation(
        node, tmp_path_factory.mktemp("node-charts"), realm_url=issuer.url, clusters=clusters, home="home"
    )
    try:
        found.images()
        for entry in found.clusters.values():
            assert entry.control_plane is not None
            _grant_read(entry.control_plane)
        yield found
    finally:
        try:
            found.uninstall()
        finally:
            found.close()
            path = Path(tmp_path_factory.getbasetemp()) / "node-charts.json"
            path.write_text(json.dumps({**MEASURED, "helm": found.timings}, indent=2) + "\n")
            print(f"\n[node charts] {json.dumps({**MEASURED, 'helm': found.timings})}")


class Caller:
    """Clients of the hub's Service for every protocol, with a reader's token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.headers = {"authorization": f"Bearer {token}"}
        self._transports: list[HTTPTransport] = []
        self._clients: list[ResourceServiceClient] = []

    def client(self, transport: str) -> ResourceServiceClient:
        protocol, version, json_codec = TRANSPORTS[transport]
        http = HTTPTransport(http_version=version)
        self._transports.append(http)
        codec = google_protobuf_json_codec() if json_codec else google_protobuf_binary_codec()
        found = ResourceServiceClient(
            self.url, protocol=protocol, codec=codec, http_client=Client(http), timeout_ms=30_000
        )
        self._clients.append(found)
        return found

    async def get_default_namespace(self, transport: str, cluster: str) -> str:
        got = await self.client(transport).get(
            pb.GetRequest(cluster=cluster, version="v1", resource="namespaces", name="default"),
            headers=self.headers,
        )
        return str(got.object["metadata"]["name"])

    async def every_protocol_everywhere(self) -> None:
        for transport in TRANSPORTS:
            for cluster in CLUSTERS:
                assert await self.get_default_namespace(transport, cluster) == "default", (transport, cluster)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()
        for transport in self._transports:
            await transport.aclose()


@pytest.fixture
async def caller(installation: Installation, issuer: LocalIssuer) -> AsyncIterator[Caller]:
    token = issuer.token("node-charts-user", (READER_GROUP,), audience="otterscale")
    found = Caller(installation.hub_url, token)
    try:
        yield found
    finally:
        await found.aclose()


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def _pods(node: Node, namespace: str) -> list[dict[str, Any]]:
    found = node.control_plane.request("GET", f"/api/v1/namespaces/{namespace}/pods")
    return [p for p in found["items"] if not p["metadata"].get("deletionTimestamp")]


def _wait(check: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (KubeAPIError, OSError):
            pass
        assert time.monotonic() - started < timeout, f"{what} not within {timeout:.0f}s"
        time.sleep(0.1)


def _all_connected(installation: Installation) -> bool:
    return installation.system().connected() == {name: True for name in CLUSTERS}


def _assert_every_pod_ready_through_its_probes(node: Node, installation: Installation) -> None:
    namespaces = {NAMESPACE, *(installation.agent_namespace(name) for name in CLUSTERS)}
    for namespace in namespaces:
        pods = _pods(node, namespace)
        assert pods, namespace
        for pod in pods:
            name = pod["metadata"]["name"]
            assert _ready(pod), f"{namespace}/{name} is not Ready: {pod['status']}"
            for container in pod["spec"]["containers"]:
                assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(container), name
            # The init container merged the configuration with a read-only root and exited 0.
            (init,) = pod["status"]["initContainerStatuses"]
            assert init["state"]["terminated"]["exitCode"] == 0, init
            assert all(c["restartCount"] == 0 for c in pod["status"]["containerStatuses"]), pod["status"]


async def test_one_hub_replica_and_three_agents_serve_every_protocol(
    node: Node, installation: Installation, caller: Caller
) -> None:
    seconds = installation.install_hub(replicas=1)
    MEASURED["hub 1 replica: helm install -> every Pod Ready (s)"] = round(seconds, 1)
    for name in CLUSTERS:
        MEASURED[f"agent {name}: helm install -> Ready, tunnel up (s)"] = round(
            installation.install_agent(name), 1
        )
    _wait(lambda: _all_connected(installation), 60, "the hub reporting every cluster connected")
    _assert_every_pod_ready_through_its_probes(node, installation)
    await caller.every_protocol_everywhere()
    # Remote agents act in their own cluster, not in the node's.
    cp = installation.clusters["east"].control_plane
    assert cp is not None
    marker = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "only-in-east"}}
    cp.apply(marker)
    client = caller.client("connect-proto")
    got = await client.get(
        pb.GetRequest(cluster="east", version="v1", resource="namespaces", name="only-in-east"),
        headers=caller.headers,
    )
    assert got.object["metadata"]["name"] == "only-in-east"
    with pytest.raises(ConnectError) as absent:
        await client.get(
            pb.GetRequest(cluster="home", version="v1", resource="namespaces", name="only-in-east"),
            headers=caller.headers,
        )
    assert absent.value.code is Code.NOT_FOUND


def _one_leader_selected(installation: Installation) -> str | None:
    """The leader Pod's name when exactly it is labelled and is the tunnel Service's only endpoint."""
    try:
        leader = installation.leader()
    except NodeError:  # two labelled for a moment: the new leader has not unlabelled the old yet
        return None
    if leader is None or not _ready(leader):
        return None
    if installation.tunnel_endpoints() != [leader["status"]["podIP"]]:
        return None
    return str(leader["metadata"]["name"])


async def test_three_replicas_elect_one_leader_and_the_tunnel_service_selects_it(
    node: Node, installation: Installation, caller: Caller
) -> None:
    seconds = installation.install_hub(replicas=3)
    MEASURED["hub 1 -> 3 replicas: helm upgrade -> every Pod Ready (s)"] = round(seconds, 1)
    pods = installation.hub_pods()
    assert len(pods) == 3
    assert all(_ready(p) for p in pods)
    _wait(lambda: _one_leader_selected(installation), 60, "one labelled leader behind the tunnel Service")
    _wait(lambda: _all_connected(installation), 60, "every agent connected to the leader")
    leaders = [
        p for p in installation.hub_pods() if p["metadata"]["labels"].get("otterscale.io/leader") == "true"
    ]
    assert len(leaders) == 1
    _assert_every_pod_ready_through_its_probes(node, installation)
    await caller.every_protocol_everywhere()  # through any replica: followers forward to the leader
    await _watch_sees_a_change(caller, installation)


async def _watch_sees_a_change(caller: Caller, installation: Installation) -> None:
    """A Watch through the hub's Service sees a ConfigMap created in the east cluster."""
    cp = installation.clusters["east"].control_plane
    assert cp is not None
    name = f"watched-{int(time.time() * 1000)}"
    client = caller.client("grpc")
    ref = {"cluster": "east", "version": "v1", "resource": "configmaps", "namespace": "default"}
    start = await client.list(pb.ListRequest(**ref), headers=caller.headers)

    async def first_added() -> str:
        request = pb.WatchRequest(**ref, resource_version=start.resource_version)
        # Closed explicitly: a stream left open at the end of the test keeps its task alive.
        async with contextlib.aclosing(
            client.watch(request, headers=caller.headers, timeout_ms=60_000)
        ) as events:
            async for event in events:
                if event.type == pb.WatchEvent.TYPE_ADDED:
                    return str(event.resource.object["metadata"]["name"])
        raise AssertionError("the watch ended without an event")

    watcher = asyncio.create_task(first_added())
    await asyncio.sleep(
        0.5
    )  # the stream is open before the change (a later start replays from start.resource_version)
    cp.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}})
    assert await asyncio.wait_for(watcher, 60) == name


async def test_a_killed_leader_is_replaced_and_calls_work_again(
    node: Node, installation: Installation, caller: Caller
) -> None:
    old = _one_leader_selected(installation)
    assert old is not None
    killed = time.monotonic()
    node.control_plane.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{old}?gracePeriodSeconds=0")
    new_leader = _wait(
        lambda: (name := _one_leader_selected(installation)) is not None and name != old,
        120,
        "a new leader labelled and selected by the tunnel Service",
    )
    _wait(lambda: _all_connected(installation), 120, "every agent reconnected to the new leader")
    reconnected = time.monotonic() - killed

    async def calls_work() -> float:
        while True:
            try:
                await caller.every_protocol_everywhere()
                return time.monotonic() - killed
            except ConnectError:
                assert time.monotonic() - killed < 120, "calls through the Service did not recover"
                await asyncio.sleep(0.2)

    working = await calls_work()
    MEASURED["leader Pod killed -> new leader labelled and selected (s)"] = round(new_leader, 1)
    MEASURED["leader Pod killed -> every agent reconnected (s)"] = round(reconnected, 1)
    MEASURED["leader Pod killed -> calls work on every protocol (s)"] = round(working, 1)
    _wait(lambda: len([p for p in installation.hub_pods() if _ready(p)]) == 3, 120, "the third replica back")


async def test_a_crashed_leader_is_followed_by_one_leader_again(
    node: Node, installation: Installation, caller: Caller
) -> None:
    """The leader's container SIGKILLed (no hand-over, the Lease not released): the kubelet
    restarts it, and one leader, the restarted replica (the Lease's holder is its Pod) or a
    follower once the Lease expired, is labelled and selected again; agents and calls follow."""
    _wait(lambda: _one_leader_selected(installation), 60, "one labelled leader before the crash")
    old = _one_leader_selected(installation)
    assert old is not None
    restarts = _restarts(node, old)
    killed = time.monotonic()
    assert node.kill_container(NAMESPACE, old, "hub") >= 1
    _wait(lambda: _restarts(node, old) > restarts, 120, "the kubelet restarting the crashed container")
    _wait(lambda: _one_leader_selected(installation), 120, "one leader after the crash")
    leader_again = time.monotonic() - killed
    winner = _one_leader_selected(installation)
    _wait(lambda: _all_connected(installation), 120, "every agent reconnected after the crash")
    reconnected = time.monotonic() - killed
    deadline = time.monotonic() + 120
    while True:
        try:
            await caller.every_protocol_everywhere()
            break
        except ConnectError:
            assert time.monotonic() < deadline, "calls through the Service did not recover"
            await asyncio.sleep(0.2)
    MEASURED["leader container SIGKILLed -> one leader labelled and selected (s)"] = round(leader_again, 1)
    MEASURED["leader container SIGKILLed -> the new leader is the restarted Pod"] = winner == old
    MEASURED["leader container SIGKILLed -> every agent reconnected (s)"] = round(reconnected, 1)
    MEASURED["leader container SIGKILLed -> calls work on every protocol (s)"] = round(
        time.monotonic() - killed, 1
    )
    _wait(lambda: len([p for p in installation.hub_pods() if _ready(p)]) == 3, 120, "every replica Ready")


class ContinuousCalls:
    """Connect JSON Gets through the Service every 50 ms, in a thread, until :meth:`stop`.

    Plain HTTP/1.1 (as curl would call it) with a bounded timeout, so nothing can outlive the test.
    A call that gets an HTTP answer reached a hub (``answered`` or ``errors``); one that could not
    connect or lost its connection did not (``unreached``).
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url + "/otterscale.resource.v1.ResourceService/Get"
        self.headers = {**headers, "Content-Type": "application/json"}
        self.answered = 0
        self.errors: list[str] = []
        self.unreached: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="calls-during-rollout", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = json.dumps(
            {"cluster": "home", "version": "v1", "resource": "namespaces", "name": "default"}
        ).encode()
        while not self._stop.wait(0.05):
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - the node
                    resp.read()
                    self.answered += 1
            except urllib.error.HTTPError as exc:
                self.errors.append(f"HTTP {exc.code}: {exc.read()[:200]!r}")
            except OSError as exc:  # refused, reset, timed out: no hub answered
                self.unreached.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _restarts(node: Node, pod: str) -> int:
    found = node.control_plane.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}")
    return int(next(c["restartCount"] for c in found["status"]["containerStatuses"] if c["name"] == "hub"))


async def test_helm_upgrade_with_a_changed_value_rolls_out(
    node: Node, installation: Installation, caller: Caller
) -> None:
    before = {p["metadata"]["name"] for p in installation.hub_pods()}
    calls = ContinuousCalls(installation.hub_url, caller.headers)
    try:
        seconds = installation.install_hub(3, {"logLevel": "info", "podAnnotations": {"rolled": "yes"}})
    finally:
        calls.stop()
    MEASURED["rollout of 3 replicas: calls through the Service (ok, answered with an error, unreached)"] = [
        calls.answered,
        len(calls.errors),
        len(calls.unreached),
    ]
    # Calls may be answered unavailable while the leader changes (a follower cannot reach the old
    # leader, agents reconnect): the hub says so and asks for a retry. But the Service itself must
    # never send a connection to a replica that stopped listening: every call must reach a hub.
    assert calls.answered > 0
    assert not calls.unreached, calls.unreached[:5]
    MEASURED["hub 3 replicas: helm upgrade (changed value) -> rolled out (s)"] = round(seconds, 1)
    pods = installation.hub_pods()
    assert len(pods) == 3
    assert not before & {p["metadata"]["name"] for p in pods}, "every Pod is new"
    for pod in pods:
        assert _ready(pod)
        assert pod["metadata"]["annotations"]["rolled"] == "yes"
        assert "--log-level=info" in pod["spec"]["containers"][0]["args"]
    _wait(lambda: _one_leader_selected(installation), 60, "one labelled leader after the rollout")
    _wait(lambda: _all_connected(installation), 120, "every agent connected after the rollout")
    await caller.every_protocol_everywhere()


def _leftovers(node: Node, namespaces: set[str]) -> list[str]:
    """Every object of either release (or any Lease) left in the releases' namespaces and cluster-wide."""
    admin = node.control_plane
    releases = (HUB_RELEASE, AGENT_RELEASE)
    found = []
    for namespace in sorted(namespaces):
        for path in (
            "/api/v1/namespaces/{}/pods",
            "/api/v1/namespaces/{}/services",
            "/api/v1/namespaces/{}/configmaps",
            "/api/v1/namespaces/{}/secrets",
            "/api/v1/namespaces/{}/serviceaccounts",
            "/apis/apps/v1/namespaces/{}/deployments",
            "/apis/apps/v1/namespaces/{}/replicasets",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/{}/roles",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/{}/rolebindings",
            "/apis/policy/v1/namespaces/{}/poddisruptionbudgets",
            "/apis/networking.k8s.io/v1/namespaces/{}/networkpolicies",
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
        ):
            for item in admin.request("GET", path.format(namespace))["items"]:
                labels = item["metadata"].get("labels", {})
                # Pods and ReplicaSets carry the selector labels; a Lease the hub made carries none.
                if labels.get("app.kubernetes.io/instance") in releases or path.endswith("leases"):
                    found.append(f"{namespace}/{path.rsplit('/', 1)[1]}/{item['metadata']['name']}")
    for path in (
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies",
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings",
    ):
        for item in admin.request("GET", path)["items"]:
            if item["metadata"].get("labels", {}).get("app.kubernetes.io/instance") in releases:
                found.append(f"{path.rsplit('/', 1)[1]}/{item['metadata']['name']}")
    return found


def test_helm_uninstall_leaves_nothing(node: Node, installation: Installation) -> None:
    namespaces = {NAMESPACE, *(installation.agent_namespace(name) for name in CLUSTERS)}
    assert any("leases/" in item for item in _leftovers(node, namespaces))  # the check sees the Lease
    started = time.monotonic()
    installation.uninstall()
    # Pods end after their grace period (the hubs drain, the agents close their Watches).
    while (left := _leftovers(node, namespaces)) and time.monotonic() - started < 120:
        time.sleep(0.5)
    assert left == []
    MEASURED["helm uninstall -> nothing of the releases left (s)"] = round(time.monotonic() - started, 1)
