"""Latency of the agent vs a direct kube-apiserver call, on loopback (prints a table; no asserts).

    python packages/agent/bench/latency.py [--iterations 100] [--skip-big-lists]

Starts a throw-away control plane (the test tools' etcd + kube-apiserver + controller manager,
``nox -s tools`` builds them) and the agent as a real subprocess (``python -m otterscale.agent``),
then measures, per RPC, the p50 of N sequential calls:

- through the agent: a Connect client (pyqwest) signing like the hub, over Connect/HTTP/1.1 and
  gRPC/h2c, response decoded to protobuf;
- direct: aiohttp to kube-apiserver with the admin certificate, response decoded with json.loads
  (the least any client does).

Then List of 1,000 and 5,000 ConfigMaps (p50 of 5) both ways, with and without gzip between the
client and the agent. Everything runs on one 2-core machine: the numbers are relative, not
absolute, and include the client's own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.agent._structs import allow_deep_messages
from otterscale.common import Identity, derive_identity_key, sign_identity
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane, free_port, start_control_plane

CLUSTER = "bench"
PASSWORD = "bench-agent-password-0123456789-abcdef"  # noqa: S105 - a throw-away bench cluster
KEY = derive_identity_key(CLUSTER, PASSWORD)
CALLER = Identity("bench-admin")

CONFIG = f"""
keycloak: {{realm_url: "https://keycloak.invalid/realms/x", client_id: x}}
tunnel: {{server: {{host: 127.0.0.1, port: 8300}}}}
clusters:
  {CLUSTER}:
    agent: {{auth: {{user: bench, pass: {PASSWORD}}}, tunnel_port: 51001, api_port: 8299}}
"""


class Signer:
    async def on_start(self, ctx: Any) -> None:
        method = f"/{ctx.method.service_name}/{ctx.method.name}"
        for name, value in sign_identity(CALLER, cluster=CLUSTER, method=method, key=KEY).items():
            ctx.request_headers[name] = value

    async def on_end(self, token: Any, ctx: Any, error: Exception | None) -> None:
        return None


async def p50(fn: Callable[[int], Awaitable[Any]], n: int) -> float:
    for i in range(min(5, n)):  # warm-up: connections, caches
        await fn(-1 - i)
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await fn(i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def _admin_binding(cp: ControlPlane) -> None:
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "bench-admin"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "User", "name": CALLER.subject, "apiGroup": "rbac.authorization.k8s.io"}],
        }
    )


def _namespace(cp: ControlPlane, name: str) -> None:
    cp.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )


async def _fill(session: aiohttp.ClientSession, server: str, namespace: str, count: int) -> None:
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"cm-{i:05d}", "labels": {"app": "bench", "index": str(i)}},
            "data": {"a": "x" * 100, "b": "hello world", "c": str(i)},
        }
        async with sem, session.post(f"{server}/api/v1/namespaces/{namespace}/configmaps", json=body) as resp:
            resp.raise_for_status()

    await asyncio.gather(*(one(i) for i in range(count)))


async def run(args: argparse.Namespace, cp: ControlPlane, agent_url: str) -> None:
    ssl_ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    ssl_ctx.load_cert_chain(str(cp.admin_cert), str(cp.admin_key))
    connector = aiohttp.TCPConnector(ssl=ssl_ctx)
    direct = aiohttp.ClientSession(connector=connector, headers={"Accept-Encoding": "identity"})
    server = cp.server
    transports = {
        "connect/h1": (ProtocolType.CONNECT, HTTPVersion.HTTP1),
        "grpc/h2c": (ProtocolType.GRPC, HTTPVersion.HTTP2),
    }
    clients: dict[str, ResourceServiceClient] = {}
    http_transports = []
    for label, (protocol, version) in transports.items():
        t = HTTPTransport(http_version=version)
        http_transports.append(t)
        clients[label] = ResourceServiceClient(
            agent_url,
            protocol=protocol,
            http_client=Client(t),
            interceptors=[Signer()],
            codec=google_protobuf_binary_codec(),
            accept_compression=[],
            send_compression=None,
        )

    async def get_json(method: str, path: str, **kw: Any) -> Any:
        async with direct.request(method, server + path, **kw) as resp:
            data = await resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {data[:200]!r}")
            return json.loads(data)

    ns = "bench-rpc"
    _namespace(cp, ns)
    await _fill(direct, server, ns, 10)
    n = args.iterations
    cm = {"cluster": CLUSTER, "version": "v1", "resource": "configmaps", "namespace": ns}
    rows: list[tuple[str, str, float]] = []

    def manifest(name: str) -> bytes:
        return f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: v\n".encode()

    async def through_agent(label: str, rpc: ResourceServiceClient) -> None:
        tag = label.replace("/", "-")

        def named(i: int) -> str:
            return f"{tag}-c{i}"

        schema = pb.SchemaRequest(cluster=CLUSTER, group="apps", version="v1", kind="Deployment")
        calls: list[tuple[str, Callable[[int], Awaitable[Any]]]] = [
            ("Get", lambda i: rpc.get(pb.GetRequest(name="cm-00001", **cm))),
            ("List (10 items)", lambda i: rpc.list(pb.ListRequest(**cm))),
            ("Create", lambda i: rpc.create(pb.CreateRequest(manifest=manifest(named(i)), **cm))),
            (
                "Apply",
                lambda i: rpc.apply(
                    pb.ApplyRequest(name=named(i), manifest=manifest(named(i)), force=True, **cm)
                ),
            ),
            ("Delete", lambda i: rpc.delete(pb.DeleteRequest(name=named(i), **cm))),
            ("Discovery (cached)", lambda i: rpc.discovery(pb.DiscoveryRequest(cluster=CLUSTER))),
            ("Schema Deployment (cached)", lambda i: rpc.schema(schema)),
        ]
        for name, call in calls:
            rows.append((name, label, await p50(call, n)))

    for label, rpc in clients.items():
        await through_agent(label, rpc)

    base = f"/api/v1/namespaces/{ns}/configmaps"
    rows.append(("Get", "direct", await p50(lambda i: get_json("GET", f"{base}/cm-00001"), n)))
    rows.append(("List (10 items)", "direct", await p50(lambda i: get_json("GET", base), n)))

    def cm_body(name: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}}

    rows.append(
        ("Create", "direct", await p50(lambda i: get_json("POST", base, json=cm_body(f"direct-c{i}")), n))
    )
    rows.append(
        (
            "Apply",
            "direct",
            await p50(
                lambda i: get_json(
                    "PATCH",
                    f"{base}/direct-c{i}?fieldManager=bench&force=true",
                    data=json.dumps(cm_body(f"direct-c{i}")),
                    headers={"Content-Type": "application/apply-patch+yaml"},
                ),
                n,
            ),
        )
    )
    rows.append(("Delete", "direct", await p50(lambda i: get_json("DELETE", f"{base}/direct-c{i}"), n)))
    aggregated = {"Accept": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"}

    async def discovery(_: int) -> None:
        await asyncio.gather(
            get_json("GET", "/api", headers=aggregated), get_json("GET", "/apis", headers=aggregated)
        )

    rows.append(("Discovery (cached)", "direct (/api + /apis)", await p50(discovery, n)))
    index = await get_json("GET", "/openapi/v3")
    apps = index["paths"]["apis/apps/v1"]["serverRelativeURL"]
    rows.append(
        (
            "Schema Deployment (cached)",
            "direct (whole apps/v1 doc)",
            await p50(lambda i: get_json("GET", apps), n),
        )
    )

    # Watch: from a write (as admin) to the event arriving.
    async def watch_latency(use_agent: ResourceServiceClient | None, count: int) -> float:
        ns_w = "bench-watch"
        samples = []
        listed = await get_json("GET", f"/api/v1/namespaces/{ns_w}/configmaps")
        queue: asyncio.Queue[float] = asyncio.Queue()

        async def consume() -> None:
            if use_agent is not None:
                async for event in use_agent.watch(
                    pb.WatchRequest(
                        cluster=CLUSTER,
                        version="v1",
                        resource="configmaps",
                        namespace=ns_w,
                        resource_version=listed["metadata"]["resourceVersion"],
                    )
                ):
                    if event.type == pb.WatchEvent.TYPE_ADDED:
                        queue.put_nowait(time.perf_counter())
            else:
                params = {"watch": "1", "resourceVersion": listed["metadata"]["resourceVersion"]}
                async with direct.get(
                    f"{server}/api/v1/namespaces/{ns_w}/configmaps",
                    params=params,
                    timeout=aiohttp.ClientTimeout(),
                ) as resp:
                    async for line in resp.content:
                        if json.loads(line)["type"] == "ADDED":
                            queue.put_nowait(time.perf_counter())

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        tag = "agent" if use_agent is not None else "direct"
        for i in range(count):
            started = time.perf_counter()
            await get_json("POST", f"/api/v1/namespaces/{ns_w}/configmaps", json=cm_body(f"{tag}-w{i}"))
            arrived = await asyncio.wait_for(queue.get(), 10)
            samples.append(arrived - started)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return statistics.median(samples) * 1000

    _namespace(cp, "bench-watch")
    rows.append(("Watch (write -> event)", "grpc/h2c", await watch_latency(clients["grpc/h2c"], min(n, 50))))
    rows.append(("Watch (write -> event)", "direct", await watch_latency(None, min(n, 50))))

    print(f"\nPer-RPC p50 over {n} sequential calls (ms):")
    print(f"  {'RPC':30s} {'path':28s} {'p50 ms':>8s}")
    for rpc_name, path, value in sorted(rows, key=lambda r: (r[0], r[1])):
        print(f"  {rpc_name:30s} {path:28s} {value:8.2f}")

    if not args.skip_big_lists:
        big: list[tuple[str, str, float]] = []
        gzip_client = ResourceServiceClient(
            agent_url,
            protocol=ProtocolType.CONNECT,
            http_client=Client(http_transports[0]),
            interceptors=[Signer()],
            codec=google_protobuf_binary_codec(),
        )

        async def big_list(count: int) -> None:
            ns_big = f"bench-list-{count}"
            _namespace(cp, ns_big)
            started = time.perf_counter()
            await _fill(direct, server, ns_big, count)
            print(f"\n(created {count} ConfigMaps in {time.perf_counter() - started:.1f}s)")
            req = pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=ns_big)
            ways: list[tuple[str, Callable[[int], Awaitable[Any]]]] = [
                (f"agent {label}", lambda i, rpc=rpc: rpc.list(req)) for label, rpc in clients.items()
            ]
            ways.append(("agent connect/h1 + gzip", lambda i: gzip_client.list(req)))
            ways.append(
                (
                    "direct (GET + json.loads)",
                    lambda i: get_json("GET", f"/api/v1/namespaces/{ns_big}/configmaps"),
                )
            )
            for label, call in ways:
                big.append((f"List {count}", label, await p50(call, 5)))

        for count in (1000, 5000):
            await big_list(count)
        print("\nList of many ConfigMaps, p50 of 5 (ms):")
        for name, path, value in big:
            print(f"  {name:12s} {path:30s} {value:9.1f}")
        await gzip_client.close()

    for client in clients.values():
        await client.close()
    for t in http_transports:
        await t.aclose()
    await direct.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--skip-big-lists", action="store_true")
    args = parser.parse_args()
    allow_deep_messages()  # Schema answers nest deeper than upb's default limit (see _structs)

    workdir = Path(tempfile.mkdtemp(prefix="otterscale-bench-"))
    cp = start_control_plane("bench", workdir / "cluster")
    agent: subprocess.Popen[bytes] | None = None
    try:
        _admin_binding(cp)
        cp.wait_for(
            lambda: cp.request("GET", "/api/v1/namespaces", headers={"Impersonate-User": CALLER.subject}),
            what="admin binding",
        )
        config = workdir / "otterscale.yaml"
        config.write_text(CONFIG)
        port = free_port()
        log = (workdir / "agent.log").open("wb")
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        agent = subprocess.Popen(
            [sys.executable, "-m", "otterscale.agent", "--cluster", CLUSTER, "--config", str(config),
             "--address", f"127.0.0.1:{port}", "--kubeconfig", str(cp.kubeconfig), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=1):  # noqa: S310
                    break
            except OSError:
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise RuntimeError("agent did not start; see " + str(workdir / "agent.log")) from None
                time.sleep(0.1)
        print(f"control plane {cp.server}, agent {url} (pid {agent.pid}), {os.cpu_count()} CPUs")
        asyncio.run(run(args, cp, url))
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(10)
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
