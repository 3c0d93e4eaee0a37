"""The runtime scenario: exec, log follow, port-forward and idle sessions through the hub.

Needs the real test node (``otterscale.testing.start_node``: kubelet, containerd, runc, CNI; root
and the node tools), the ``python`` image of ``nox -s images``, and starts its own hub and agent
(OS processes, real chisel tunnel, tokens from a ``LocalIssuer``) in front of the node's API
server. Measured through the hub, over one HTTP/2 connection (Connect, h2c) per client:

- **keystroke round trip**: one byte written to ``cat`` with WriteTTY until it is echoed on the
  ExecuteTTY stream (target p50 <= 15 ms, p99 <= 50 ms);
- **log-follow delivery**: a container prints its own clock every 20 ms; the time from that
  clock to the line arriving at the client (same machine, same clock; target p99 <= 100 ms);
- **port-forward**: bytes per second of one stream from a pod's TCP server (target >= 50 MB/s),
  and the round trip of a small HTTP/1.1 request over an open session compared with the same
  request over a WebSocket port-forward straight to kube-apiserver (kubectl's path without the
  hub and the agent; target <= 2 ms added p50);
- **idle sessions**: RSS and CPU of agent and hub with ``sessions`` idle ``cat`` sessions open
  (target: agent <= 100 MiB more RSS and <= 1 % of a core, hub <= 50 MiB more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped,unused-ignore]
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.runtime.v1 import runtime_pb2 as pb
from otterscale.runtime.v1.runtime_connect import RuntimeServiceClient
from otterscale.testing import LocalIssuer, Node, start_node, start_system

from ._stats import summary

logger = logging.getLogger("otterscale_bench.runtime")

CLUSTER = "node"
NAMESPACE = "bench-runtime"
CLIENT_ID = "otterscale"
USER = "bench-runtime"
MIB = 1024 * 1024

#: A pod serving two ports: 9000 sends as many zero bytes as the first line asks for, then
#: closes; 8080 answers HTTP/1.1 requests on a kept-alive connection with a 2-byte body.
SERVER = r"""
import socket, threading
def zeros(conn):
    with conn:
        size = int(conn.makefile('rb').readline())
        chunk = bytes(1 << 20)
        while size > 0:
            conn.sendall(chunk[:min(size, len(chunk))]); size -= len(chunk)
def http(conn):
    with conn:
        reader = conn.makefile('rb')
        while True:
            line = reader.readline()
            if not line: return
            while reader.readline() not in (b'\r\n', b''): pass
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok')
def serve(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(9000, zeros), daemon=True).start()
serve(8080, http)
"""
CLOCK = [
    "python3",
    "-u",
    "-c",
    "import time\nwhile True:\n print(repr(time.time()), flush=True); time.sleep(0.02)",
]
SLEEPER = ["python3", "-c", "import time\nwhile True: time.sleep(3600)"]


@dataclass(frozen=True)
class RuntimeSizes:
    keystrokes: int
    log_lines: int
    forward_bytes: int
    http_requests: int
    idle_sessions: int
    idle_seconds: float


FULL = RuntimeSizes(
    keystrokes=300,
    log_lines=500,
    forward_bytes=256 * MIB,
    http_requests=300,
    idle_sessions=100,
    idle_seconds=30.0,
)
SMOKE = RuntimeSizes(
    keystrokes=20, log_lines=30, forward_bytes=8 * MIB, http_requests=20, idle_sessions=10, idle_seconds=3.0
)


class _Bearer:
    def __init__(self, token: str) -> None:
        self._token = token

    async def on_start(self, ctx: Any) -> None:
        ctx.request_headers["authorization"] = f"Bearer {self._token}"

    async def on_end(self, *_: Any) -> None:
        return None


@contextlib.asynccontextmanager
async def _client(url: str, token: str) -> AsyncIterator[RuntimeServiceClient]:
    transport = HTTPTransport(http_version=HTTPVersion.HTTP2)
    client = RuntimeServiceClient(
        url,
        protocol=ProtocolType.CONNECT,
        http_client=Client(transport),
        interceptors=[_Bearer(token)],
        send_compression=None,
    )
    try:
        yield client
    finally:
        await client.close()
        await transport.aclose()


async def keystrokes(client: RuntimeServiceClient, pod: str, count: int) -> dict[str, float]:
    stream = aiter(
        client.execute_tty(
            pb.ExecuteTTYRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pod, command=["cat"])
        )
    )
    first = await anext(stream)
    times: list[float] = []
    try:
        for i in range(count):
            started = time.perf_counter()
            await client.write_tty(pb.WriteTTYRequest(session_id=first.session_id, stdin=b"k", offset=i))
            while not (await anext(stream)).stdout:
                pass  # a heartbeat
            times.append((time.perf_counter() - started) * 1000)
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]
    return summary(times)


async def log_delivery(client: RuntimeServiceClient, pod: str, lines: int) -> dict[str, float]:
    request = pb.PodLogRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pod, follow=True, tail_lines=0)
    delays: list[float] = []
    async for message in client.pod_log(request):
        arrived = time.time()
        for line in message.data.splitlines():
            delays.append((arrived - float(line)) * 1000)
        if len(delays) >= lines:
            break
    return summary(delays[5:])  # the first lines may predate the follow


async def forward_throughput(client: RuntimeServiceClient, pod: str, size: int) -> dict[str, float]:
    stream = aiter(
        client.port_forward(pb.PortForwardRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pod, port=9000))
    )
    first = await anext(stream)
    started = time.perf_counter()
    await client.write_port_forward(
        pb.WritePortForwardRequest(session_id=first.session_id, data=f"{size}\n".encode())
    )
    received = 0
    async for message in stream:
        received += len(message.data)
    elapsed = time.perf_counter() - started
    return {"bytes": received, "seconds": round(elapsed, 3), "mb_per_s": round(received / elapsed / 1e6, 1)}


_REQUEST = b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n"
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def forward_http_hub(client: RuntimeServiceClient, pod: str, count: int) -> dict[str, float]:
    stream = aiter(
        client.port_forward(pb.PortForwardRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pod, port=8080))
    )
    first = await anext(stream)
    times: list[float] = []
    offset = 0
    try:
        for _ in range(count):
            started = time.perf_counter()
            await client.write_port_forward(
                pb.WritePortForwardRequest(session_id=first.session_id, data=_REQUEST, offset=offset)
            )
            offset += len(_REQUEST)
            got = b""
            while len(got) < len(_ANSWER):
                got += (await anext(stream)).data
            times.append((time.perf_counter() - started) * 1000)
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]
    return summary(times)


async def forward_http_direct(
    server: str, ssl_context: ssl.SSLContext, pod: str, count: int
) -> dict[str, float]:
    """The same requests over a WebSocket port-forward straight to kube-apiserver (as admin)."""
    times: list[float] = []
    connector = aiohttp.TCPConnector(ssl=ssl_context)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"{server}/api/v1/namespaces/{NAMESPACE}/pods/{pod}/portforward"
        async with session.ws_connect(url, params={"ports": "8080"}, protocols=("v4.channel.k8s.io",)) as ws:
            announced = 0
            while announced < 2:  # the port announcement on the data and the error channel
                await ws.receive_bytes()
                announced += 1
            for _ in range(count):
                started = time.perf_counter()
                await ws.send_bytes(b"\x00" + _REQUEST)
                got = b""
                while len(got) < len(_ANSWER):
                    data = await ws.receive_bytes()
                    if data[0] == 0:
                        got += data[1:]
                times.append((time.perf_counter() - started) * 1000)
    return summary(times)


async def idle_sessions(
    url: str, token: str, pod: str, count: int, seconds: float, pids: dict[str, int]
) -> dict[str, Any]:
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def rss() -> dict[str, float]:
        return {name: proc.memory_info().rss / MIB for name, proc in procs.items()}

    def cpu() -> dict[str, float]:
        return {name: sum(proc.cpu_times()[:2]) for name, proc in procs.items()}

    await asyncio.sleep(2.0)
    before = rss()
    streams: list[Any] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(_client(url, token)) for _ in range(max(1, count // 50))]
        for i in range(count):
            client = clients[i % len(clients)]
            stream = aiter(
                client.execute_tty(
                    pb.ExecuteTTYRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pod, command=["cat"])
                )
            )
            await anext(stream)
            streams.append(stream)
        await asyncio.sleep(2.0)
        cpu_before, started = cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu_after, elapsed = cpu(), time.monotonic() - started
        during = rss()
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
    return {
        "sessions": count,
        "rss_mib_before": {k: round(v, 1) for k, v in before.items()},
        "rss_mib_added": {k: round(during[k] - before[k], 1) for k in before},
        "cpu_percent_of_a_core": {
            k: round(100 * (cpu_after[k] - cpu_before[k]) / elapsed, 2) for k in before
        },
        "idle_seconds": round(elapsed, 1),
    }


def _prepare(node: Node) -> dict[str, str]:
    cp = node.control_plane
    with contextlib.suppress(Exception):
        cp.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
    cp.wait_for(
        lambda: cp.request("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"), 60, "sa"
    )
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": USER},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "User", "name": USER, "apiGroup": "rbac.authorization.k8s.io"}],
        }
    )
    image = node.image("python")
    pods = {"shell": "shell", "clock": "clock", "server": "server"}
    node.run_pod("shell", image, SLEEPER, namespace=NAMESPACE, wait=False)
    node.run_pod("clock", image, CLOCK, namespace=NAMESPACE, wait=False)
    node.run_pod("server", image, ["python3", "-c", SERVER], namespace=NAMESPACE, wait=False)
    for name in pods.values():
        node.wait_pod_ready(NAMESPACE, name)
    return pods


def run(work: Path, sizes: RuntimeSizes) -> dict[str, Any]:
    """Start the node, a hub and an agent; measure; stop everything. Returns the results."""
    node = start_node(work / "node")
    issuer = LocalIssuer().start()
    system = None
    try:
        pods = _prepare(node)
        limit = max(200, sizes.idle_sessions * 2)
        system = start_system(
            work / "system",
            {CLUSTER: node.control_plane},
            realm_url=issuer.url,
            client_id=CLIENT_ID,
            log_level="info",
            extra_config={"runtime": {"max_exec_sessions_per_subject": limit, "max_exec_sessions": limit}},
        )
        assert system.hub is not None
        token = issuer.token(USER, audience=CLIENT_ID)
        pids = {"hub": system.hub.pid, "agent": system.agents[CLUSTER].pid}
        hub_url = system.hub_url

        async def measure() -> dict[str, Any]:
            results: dict[str, Any] = {}
            async with _client(hub_url, token) as client:
                await keystrokes(client, pods["shell"], 5)  # warm-up: connections, discovery
                results["keystroke_ms"] = await keystrokes(client, pods["shell"], sizes.keystrokes)
                results["log_delivery_ms"] = await log_delivery(client, pods["clock"], sizes.log_lines)
                results["port_forward_throughput"] = await forward_throughput(
                    client, pods["server"], sizes.forward_bytes
                )
                results["port_forward_http_hub_ms"] = await forward_http_hub(
                    client, pods["server"], sizes.http_requests
                )
            results["port_forward_http_direct_ms"] = await forward_http_direct(
                node.control_plane.server, node.control_plane.ssl_context, pods["server"], sizes.http_requests
            )
            results["port_forward_http_added_p50_ms"] = round(
                results["port_forward_http_hub_ms"]["p50"] - results["port_forward_http_direct_ms"]["p50"], 2
            )
            results["idle_sessions"] = await idle_sessions(
                hub_url, token, pods["shell"], sizes.idle_sessions, sizes.idle_seconds, pids
            )
            return results

        return asyncio.run(measure())
    finally:
        if system is not None:
            system.stop()
        issuer.stop()
        node.stop()


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """Whether each of the issue's targets was met (results of :func:`run`)."""
    idle = results["idle_sessions"]
    return {
        "keystroke p50 <= 15 ms": results["keystroke_ms"]["p50"] <= 15,
        "keystroke p99 <= 50 ms": results["keystroke_ms"]["p99"] <= 50,
        "log delivery p99 <= 100 ms": results["log_delivery_ms"]["p99"] <= 100,
        "port-forward >= 50 MB/s": results["port_forward_throughput"]["mb_per_s"] >= 50,
        "port-forward added p50 <= 2 ms": results["port_forward_http_added_p50_ms"] <= 2,
        "idle agent <= 100 MiB": idle["rss_mib_added"]["agent"] <= 100,
        "idle agent <= 1 % core": idle["cpu_percent_of_a_core"]["agent"] <= 1,
        "idle hub <= 50 MiB": idle["rss_mib_added"]["hub"] <= 50,
    }
