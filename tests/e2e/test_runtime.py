"""RuntimeService end to end: clients → hub → chisel → agent → kube-apiserver → kubelet → Pods.

The cluster is the real test node (``node`` fixture: kubelet, containerd, runc, CNI); the hub and
its agent are OS processes started from the installed ``otterscale`` command and connected by a
real chisel tunnel; callers present real signed OIDC tokens (``LocalIssuer``), so the hub
authenticates them, signs their identity for the agent, and the agent acts as them in the
cluster. Every RPC is called through the hub over Connect (HTTP/1.1 and h2c), gRPC and gRPC-Web;
the writes (WriteTTY, ResizeTTY, WritePortForward) reach the agent by the cluster prefix of the
session id alone.

What the agent decides (limits, timeouts, ordering, audit) is tested against the same node in
``packages/agent/tests/test_runtime_node.py``; here: the path through the hub, RBAC of real
tokens, Scale and Restart rolling out real Pods, an agent killed mid-exec, the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport

from otterscale.runtime.v1 import runtime_pb2 as pb
from otterscale.runtime.v1.runtime_connect import RuntimeServiceClient
from otterscale.testing import LocalIssuer, Node, Outbox, System, otterscale_command, start_system

from .conftest import TRANSPORTS, unique

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.node]

CLUSTER = "node"
NAMESPACE = "runtime-e2e"
CLIENT_ID = "otterscale"
ADMIN = "e2e-runtime-admin"
#: Seconds to wait for what a test caused (the node answers in milliseconds when idle; the CI
#: machine is a loaded 2-core box) and for a rollout (Pods started by the kubelet).
WAIT = 60.0
ROLLOUT = 180.0

SLEEPER = ["python3", "-c", "import time\nwhile True: time.sleep(3600)"]
TICKER = ["python3", "-u", "-c", "import time\nn=0\nwhile True:\n print('tick', n); n+=1; time.sleep(0.2)"]
# The Pod's own address space: all interfaces of the Pod, its emptyDir /tmp.
WEB = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", "/tmp"]  # noqa: S104


@dataclass
class RuntimeSystem:
    system: System
    issuer: LocalIssuer
    node: Node
    pods: dict[str, str]
    users: dict[str, str] = field(default_factory=dict)

    def token(self, user: str = ADMIN, groups: tuple[str, ...] = ()) -> str:
        return self.issuer.token(user, groups, audience=CLIENT_ID)

    @property
    def admin(self) -> Any:
        return self.node.control_plane


def _bind(cp: Any, user: str, kind: str, role: str, *, namespace: str | None = None) -> None:
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding" if namespace else "ClusterRoleBinding",
        "metadata": {"name": user, **({"namespace": namespace} if namespace else {})},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
        "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
    }
    cp.apply(binding)


def deployment(name: str, image: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {"name": "app", "image": image, "imagePullPolicy": "Never", "command": SLEEPER}
                    ],
                },
            },
        },
    }


@pytest.fixture(scope="module")
def runtime_system(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeSystem]:
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
    image = node.image("python")
    pods = {"shell": unique("shell"), "ticker": unique("ticker"), "web": unique("web"), "image": image}
    for role, command in (("shell", SLEEPER), ("ticker", TICKER), ("web", WEB)):
        node.run_pod(pods[role], image, command, namespace=NAMESPACE, wait=False)
    users = {"viewer": unique("viewer"), "log_reader": unique("log-reader")}
    _bind(cp, ADMIN, "ClusterRole", "cluster-admin")
    _bind(cp, users["viewer"], "ClusterRole", "view", namespace=NAMESPACE)
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "log-reader", "namespace": NAMESPACE},
            "rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]}],
        }
    )
    _bind(cp, users["log_reader"], "Role", "log-reader", namespace=NAMESPACE)
    for name in ("shell", "ticker", "web"):
        node.wait_pod_ready(NAMESPACE, pods[name])
    issuer = LocalIssuer().start()
    try:
        system = start_system(
            tmp_path_factory.mktemp("runtime-system"),
            {CLUSTER: cp},
            realm_url=issuer.url,
            client_id=CLIENT_ID,
            log_level="info",
        )
    except BaseException:
        issuer.stop()
        raise
    try:
        yield RuntimeSystem(system, issuer, node, pods, users)
    finally:
        system.stop()
        issuer.stop()


@pytest.fixture(params=list(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    """Connect over HTTP/1.1 and h2c, gRPC over h2c, gRPC-Web over HTTP/1.1."""
    return str(request.param)


@dataclass
class Clients:
    rt: RuntimeSystem
    opened: list[tuple[RuntimeServiceClient, HTTPTransport]] = field(default_factory=list)

    def __call__(
        self, transport: str = "connect-h1", *, user: str = ADMIN, json: bool = False
    ) -> RuntimeServiceClient:
        protocol, version = TRANSPORTS[transport]
        http = HTTPTransport(http_version=version)
        token = self.rt.token(user)

        class Bearer:
            async def on_start(self, ctx: Any) -> None:
                ctx.request_headers["authorization"] = f"Bearer {token}"

            async def on_end(self, *_: Any) -> None:
                return None

        client = RuntimeServiceClient(
            self.rt.system.hub_url,
            protocol=protocol,
            http_client=Client(http),
            codec=google_protobuf_json_codec() if json else google_protobuf_binary_codec(),
            interceptors=[Bearer()],
        )
        self.opened.append((client, http))
        return client


@pytest_asyncio.fixture
async def clients(runtime_system: RuntimeSystem) -> AsyncIterator[Clients]:
    found = Clients(runtime_system)
    try:
        yield found
    finally:
        for client, http in found.opened:
            await client.close()
            await http.aclose()


def exec_request(pod: str, command: list[str], **fields: Any) -> pb.ExecuteTTYRequest:
    return pb.ExecuteTTYRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pod, command=command, **fields)


async def failure(call: Any) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        await call
    return caught.value


async def first_error(stream: Any) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        await anext(aiter(stream))
    return caught.value


async def read_until(stream: Any, done: Any, limit: float = WAIT) -> list[Any]:
    messages: list[Any] = []
    async with asyncio.timeout(limit):
        async for message in stream:
            messages.append(message)
            if done(messages):
                break
    return messages


# --- every RPC, every protocol ----------------------------------------------------------------------


async def test_exec_through_the_hub(clients: Clients, runtime_system: RuntimeSystem, transport: str) -> None:
    """A TTY shell: the session id routes every write and resize to the right agent; the exit code
    comes back on the last message.

    Kubernetes applies a terminal size asynchronously (the initial one too: the runtime creates
    the terminal, then reads the resize channel), so the test asks ``stty size`` until the size
    shows, as a person would see it settle; it never sends the size any other way.
    """
    client = clients(transport)
    stream = aiter(
        client.execute_tty(exec_request(runtime_system.pods["shell"], ["sh"], tty=True, rows=24, cols=80))
    )
    first = await asyncio.wait_for(anext(stream), WAIT)
    assert first.session_id.startswith(f"{CLUSTER}.")
    offset = 0
    output = b""

    async def size_becomes(expected: bytes) -> None:
        nonlocal offset, output
        async with asyncio.timeout(WAIT):
            while True:
                await client.write_tty(
                    pb.WriteTTYRequest(session_id=first.session_id, stdin=b"stty size\n", offset=offset)
                )
                offset += len(b"stty size\n")
                answers = output.count(b"\r\n")
                while output.count(b"\r\n") < answers + 2:  # the echoed command and its answer
                    output += (await anext(stream)).stdout
                if expected in output.rsplit(b"stty size", 1)[-1]:
                    return
                await asyncio.sleep(0.2)

    await size_becomes(b"24 80")
    await client.resize_tty(pb.ResizeTTYRequest(session_id=first.session_id, rows=40, cols=100))
    await size_becomes(b"40 100")
    await client.write_tty(pb.WriteTTYRequest(session_id=first.session_id, stdin=b"exit 7\n", offset=offset))
    last = None
    async with asyncio.timeout(WAIT):
        async for message in stream:
            if message.HasField("exit_code"):
                last = message
    assert last is not None
    assert last.exit_code == 7


async def test_exec_stdin_close_in_json(clients: Clients, runtime_system: RuntimeSystem) -> None:
    """Connect JSON: the hub reads the session id from JSON (``sessionId``) too; cat ends at EOF."""
    client = clients("connect-h1", json=True)
    stream = aiter(client.execute_tty(exec_request(runtime_system.pods["shell"], ["cat"])))
    first = await asyncio.wait_for(anext(stream), WAIT)
    await client.write_tty(
        pb.WriteTTYRequest(session_id=first.session_id, stdin=b"over json\n", close_stdin=True)
    )
    messages = await read_until(stream, lambda m: m[-1].HasField("exit_code"))
    assert b"".join(m.stdout for m in messages) == b"over json\n"
    assert messages[-1].exit_code == 0


async def test_port_forward_through_the_hub(
    clients: Clients, runtime_system: RuntimeSystem, transport: str
) -> None:
    client = clients(transport)
    request = pb.PortForwardRequest(
        cluster=CLUSTER, namespace=NAMESPACE, name=runtime_system.pods["web"], port=8080
    )
    stream = aiter(client.port_forward(request))
    first = await asyncio.wait_for(anext(stream), WAIT)
    await client.write_port_forward(
        pb.WritePortForwardRequest(session_id=first.session_id, data=b"GET / HTTP/1.0\r\n\r\n", offset=0)
    )
    answer = b""
    async with asyncio.timeout(WAIT):
        async for message in stream:  # ends OK: the server closes after an HTTP/1.0 answer
            answer += message.data
    assert answer.startswith(b"HTTP/1.0 200 OK")


async def test_pod_log_follow_through_the_hub(
    clients: Clients, runtime_system: RuntimeSystem, transport: str
) -> None:
    client = clients(transport)
    request = pb.PodLogRequest(
        cluster=CLUSTER, namespace=NAMESPACE, name=runtime_system.pods["ticker"], follow=True, tail_lines=1
    )
    lines: list[bytes] = []
    async with asyncio.timeout(WAIT):
        async for message in client.pod_log(request):
            lines += message.data.splitlines()
            if len(lines) >= 4:
                break
    numbers = [int(line.split()[1]) for line in lines[:4]]
    assert numbers == list(range(numbers[0], numbers[0] + 4))  # new lines, in order, none lost


async def test_scale_and_restart_roll_out_for_real(
    clients: Clients, runtime_system: RuntimeSystem, transport: str
) -> None:
    cp = runtime_system.admin
    name = unique("web")
    cp.request(
        "POST",
        f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
        deployment(name, runtime_system.pods["image"], 1),
    )
    client = clients(transport)

    def ready_pods() -> list[dict[str, Any]]:
        pods = cp.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=app%3D{name}")["items"]
        return [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and any(
                c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or []
            )
        ]

    cp.wait_for(lambda: len(ready_pods()) == 1, ROLLOUT, "one Ready pod")
    scale = pb.ScaleRequest(
        cluster=CLUSTER,
        group="apps",
        version="v1",
        resource="deployments",
        namespace=NAMESPACE,
        name=name,
        replicas=2,
        current_replicas=1,
    )
    answer = await client.scale(scale)
    assert (answer.previous_replicas, answer.replicas) == (1, 2)
    cp.wait_for(lambda: len(ready_pods()) == 2, ROLLOUT, "two Ready pods after Scale")
    got = await client.get_scale(
        pb.GetScaleRequest(
            cluster=CLUSTER,
            group="apps",
            version="v1",
            resource="deployments",
            namespace=NAMESPACE,
            name=name,
        )
    )
    assert (got.replicas, got.status_replicas, got.selector) == (2, 2, f"app={name}")
    before = {p["metadata"]["name"] for p in ready_pods()}
    await client.restart(
        pb.RestartRequest(
            cluster=CLUSTER,
            group="apps",
            version="v1",
            resource="deployments",
            namespace=NAMESPACE,
            name=name,
        )
    )

    def rolled() -> bool:
        now = ready_pods()
        return len(now) == 2 and not ({p["metadata"]["name"] for p in now} & before)

    cp.wait_for(rolled, ROLLOUT, "two new Ready pods after Restart")


# --- RBAC as the caller, hijacks, failures ---------------------------------------------------------


async def test_view_user_cannot_exec_port_forward_scale_or_restart(
    clients: Clients, runtime_system: RuntimeSystem
) -> None:
    viewer = clients("grpc-h2c", user=runtime_system.users["viewer"])
    pods = runtime_system.pods
    error = await first_error(viewer.execute_tty(exec_request(pods["shell"], ["id"])))
    assert error.code is Code.PERMISSION_DENIED
    request = pb.PortForwardRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pods["web"], port=8080)
    error = await first_error(viewer.port_forward(request))
    assert error.code is Code.PERMISSION_DENIED
    workload = {
        "cluster": CLUSTER,
        "group": "apps",
        "version": "v1",
        "resource": "deployments",
        "namespace": NAMESPACE,
    }
    name = unique("web")
    runtime_system.admin.request(
        "POST", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments", deployment(name, pods["image"], 0)
    )
    error = await failure(viewer.scale(pb.ScaleRequest(**workload, name=name, replicas=1)))
    assert error.code is Code.PERMISSION_DENIED
    error = await failure(viewer.restart(pb.RestartRequest(**workload, name=name)))
    assert error.code is Code.PERMISSION_DENIED
    assert (await viewer.get_scale(pb.GetScaleRequest(**workload, name=name))).replicas == 0
    reader = clients(user=runtime_system.users["log_reader"])
    log = b""
    async for message in reader.pod_log(
        pb.PodLogRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pods["ticker"], tail_lines=2)
    ):
        log += message.data
    assert log.count(b"tick") == 2


async def test_hijack_attempts_through_the_hub(clients: Clients, runtime_system: RuntimeSystem) -> None:
    owner = clients("connect-h2c")
    stream = aiter(owner.execute_tty(exec_request(runtime_system.pods["shell"], ["cat"])))
    first = await asyncio.wait_for(anext(stream), WAIT)
    try:
        token = first.session_id.split(".", 1)[1]
        mallory = clients("connect-h2c", user="mallory")
        error = await failure(
            mallory.write_tty(pb.WriteTTYRequest(session_id=first.session_id, stdin=b"id\n"))
        )
        assert error.code is Code.NOT_FOUND
        assert token not in error.message
        error = await failure(
            owner.write_tty(pb.WriteTTYRequest(session_id=f"{CLUSTER}.{'B' * 22}", stdin=b"x"))
        )
        assert error.code is Code.NOT_FOUND
        error = await failure(owner.write_tty(pb.WriteTTYRequest(session_id=f"nowhere.{token}", stdin=b"x")))
        assert error.code is Code.NOT_FOUND
        assert token not in error.message
        error = await failure(owner.write_tty(pb.WriteTTYRequest(session_id="not-a-session-id", stdin=b"x")))
        assert error.code is Code.INVALID_ARGUMENT
        await owner.write_tty(pb.WriteTTYRequest(session_id=first.session_id, stdin=b"still mine\n"))
        messages = await read_until(stream, lambda m: b"still mine\n" in b"".join(x.stdout for x in m))
        assert b"".join(m.stdout for m in messages) == b"still mine\n"
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


async def test_agent_killed_mid_exec_is_unavailable(clients: Clients, runtime_system: RuntimeSystem) -> None:
    client = clients("connect-h2c")
    stream = aiter(client.execute_tty(exec_request(runtime_system.pods["shell"], ["cat"])))
    first = await asyncio.wait_for(anext(stream), WAIT)
    system = runtime_system.system
    try:
        system.kill_agent(CLUSTER)

        async def drain() -> None:
            async with asyncio.timeout(WAIT):
                async for _ in stream:
                    pass

        error = await failure(drain())
        assert error.code is Code.UNAVAILABLE
        late = await failure(client.write_tty(pb.WriteTTYRequest(session_id=first.session_id, stdin=b"x")))
        assert late.code in (Code.UNAVAILABLE, Code.NOT_FOUND)
    finally:
        system.start_agent(CLUSTER)
    # A new agent knows nothing of the old session: not found, never someone else's shell.
    error = await failure(client.write_tty(pb.WriteTTYRequest(session_id=first.session_id, stdin=b"x")))
    assert error.code is Code.NOT_FOUND


# --- the CLI ---------------------------------------------------------------------------------------


def _cli_env(runtime_system: RuntimeSystem) -> dict[str, str]:
    """The CLI's settings from the environment: the hub, the cluster, an admin's token."""
    return {
        **os.environ,
        "OTTERSCALE_HUB": runtime_system.system.hub_url,
        "OTTERSCALE_CLUSTER": CLUSTER,
        "OTTERSCALE_TOKEN": runtime_system.token(),
    }


def _cli(
    runtime_system: RuntimeSystem, *argv: str, stdin: bytes | None = None, timeout: float = WAIT
) -> subprocess.CompletedProcess[bytes]:
    command = [*otterscale_command(), *argv]
    return subprocess.run(
        command, input=stdin, capture_output=True, env=_cli_env(runtime_system), timeout=timeout, check=False
    )


@pytest.mark.parametrize("mode", [[], ["--http2"]], ids=["writes", "stream"])
def test_cli_exec_pipes_stdin_and_returns_the_exit_code(
    runtime_system: RuntimeSystem, mode: list[str]
) -> None:
    """ExecuteTTY with WriteTTY calls (any proxy), or one Exec stream (HTTP/2); a payload bigger
    than one write and than the client's pending bound, so ordering and backpressure both count."""
    payload = b"".join(b"%07d\n" % i for i in range(400_000))  # 3.2 MB
    done = _cli(
        runtime_system,
        "exec",
        runtime_system.pods["shell"],
        "-i",
        *mode,
        "-n",
        NAMESPACE,
        "--",
        "sh",
        "-c",
        "cat; exit 3",
        stdin=payload,
        timeout=ROLLOUT,
    )
    assert done.stdout == payload, (len(done.stdout), done.stderr[-500:])
    assert done.returncode == 3


def test_cli_logs_scale_restart(runtime_system: RuntimeSystem) -> None:
    done = _cli(runtime_system, "logs", runtime_system.pods["ticker"], "--tail", "2", "-n", NAMESPACE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(b"tick") == 2
    name = unique("cli")
    runtime_system.admin.request(
        "POST",
        f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
        deployment(name, runtime_system.pods["image"], 0),
    )
    done = _cli(
        runtime_system,
        "scale",
        f"deployment/{name}",
        "--replicas",
        "0",
        "--current-replicas",
        "5",
        "-n",
        NAMESPACE,
    )
    assert done.returncode == 1
    assert b"failed_precondition" in done.stderr
    done = _cli(runtime_system, "scale", f"deploy/{name}", "--replicas", "1", "-n", NAMESPACE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"deployment.apps/{name} scaled (0 -> 1)\n".encode()
    done = _cli(runtime_system, "restart", f"deployment/{name}", "-n", NAMESPACE)
    assert done.returncode == 0, done.stderr
    assert runtime_system.token().split(".")[2] not in (done.stdout + done.stderr).decode()


class PseudoTerminal:
    """The controlling terminal of a child process (a pty): what a person at a terminal types and
    sees, and the window size they drag it to."""

    def __init__(self, rows: int, cols: int) -> None:
        self.master, self.slave = pty.openpty()
        self.resize(rows, cols)
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        # On the master: the kernel sends SIGWINCH to the terminal's foreground process group.
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def read_for(self, seconds: float) -> bytes:
        got = b""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                break
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal (EIO)
                break
            if not chunk:
                break
            got += chunk
        self.seen += got
        return got

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_cli_exec_with_a_real_terminal(runtime_system: RuntimeSystem) -> None:
    """``otterscale exec -it`` on a pty: the container's terminal gets this one's size and its
    changes (SIGWINCH), and raw mode sends Ctrl-C to the remote shell instead of ending the CLI.

    Sizes reach the container asynchronously (see ``test_exec_through_the_hub``): the test asks
    ``stty size`` until the size shows, within generous bounds (a loaded 2-core CI box).
    """
    terminal = PseudoTerminal(30, 90)
    command = [
        *otterscale_command(),
        "exec",
        runtime_system.pods["shell"],
        "-i",
        "-t",
        "-n",
        NAMESPACE,
        "--",
        "sh",
    ]
    # The pty becomes the CLI's controlling terminal (login_tty), as in a terminal emulator.
    process = subprocess.Popen(
        command,
        stdin=terminal.slave,
        stdout=terminal.slave,
        stderr=terminal.slave,
        env=_cli_env(runtime_system),
        preexec_fn=functools.partial(os.login_tty, terminal.slave),
    )

    def shows(expected: bytes, ask: bytes) -> None:
        deadline = time.monotonic() + WAIT
        while expected not in terminal.seen.rsplit(ask.strip(), 1)[-1]:
            assert process.poll() is None, terminal.seen[-500:]
            assert time.monotonic() < deadline, f"{expected!r} not seen: {terminal.seen[-500:]!r}"
            terminal.type(ask)
            terminal.read_for(1.0)

    try:
        shows(b"30 90", b"stty size\n")
        terminal.resize(40, 120)
        shows(b"40 120", b"stty size\n")
        terminal.type(b"sleep 600\n")
        terminal.read_for(1.0)
        terminal.type(b"\x03")  # raw mode: interrupts the remote sleep, not this CLI
        shows(b"alive-42", b"echo alive-$((6*7))\n")
        terminal.type(b"exit 5\n")
        assert process.wait(timeout=WAIT) == 5, terminal.seen[-500:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT)
        terminal.close()


@pytest.mark.parametrize("mode", [[], ["--http2"]], ids=["writes", "stream"])
def test_cli_port_forward(runtime_system: RuntimeSystem, mode: list[str]) -> None:
    command = [
        *otterscale_command(),
        "port-forward",
        runtime_system.pods["web"],
        ":8080",
        *mode,
        "-n",
        NAMESPACE,
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_cli_env(runtime_system)
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()  # blocks until it listens (or exits)
            assert line.startswith("Forwarding from 127.0.0.1:"), line
            port = int(line.split()[2].rsplit(":", 1)[1])
            for _ in range(2):  # two local connections: two sessions
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=WAIT) as resp:
                    assert resp.status == 200
                    assert b"Directory listing" in resp.read()
        finally:
            process.terminate()
            process.wait(timeout=WAIT)


# --- hub leader change -----------------------------------------------------------------------------


async def test_hub_leader_change_ends_sessions_with_unavailable(
    runtime_system: RuntimeSystem, control_plane: Any, tmp_path: Path
) -> None:
    """Two hub replicas with leader election (the Lease on the session's control plane), the
    agent of the node behind them: an exec through the follower (which forwards to the leader)
    ends with unavailable when the leader is killed, and a new session works with the new leader.
    """
    from otterscale.testing import start_hub_replicas

    issuer = runtime_system.issuer
    replicas = await start_hub_replicas(
        control_plane,
        tmp_path / "ha",
        realm_url=issuer.url,
        client_id=CLIENT_ID,
        replicas=2,
        clusters={CLUSTER: runtime_system.node.kubeconfig},
    )
    opened: list[tuple[RuntimeServiceClient, HTTPTransport]] = []

    def client(index: int) -> RuntimeServiceClient:
        http = HTTPTransport(http_version=TRANSPORTS["connect-h2c"][1])
        token = runtime_system.token()

        class Bearer:
            async def on_start(self, ctx: Any) -> None:
                ctx.request_headers["authorization"] = f"Bearer {token}"

            async def on_end(self, *_: Any) -> None:
                return None

        found = RuntimeServiceClient(replicas.url(index), http_client=Client(http), interceptors=[Bearer()])
        opened.append((found, http))
        return found

    try:
        leader = await replicas.leader()
        follower = 1 - leader
        via_follower = client(follower)
        stream = aiter(via_follower.execute_tty(exec_request(runtime_system.pods["shell"], ["cat"])))
        first = await asyncio.wait_for(anext(stream), WAIT)
        await via_follower.write_tty(
            pb.WriteTTYRequest(session_id=first.session_id, stdin=b"before\n", offset=0)
        )
        assert (await asyncio.wait_for(anext(stream), WAIT)).stdout == b"before\n"

        async def drain() -> None:
            async with asyncio.timeout(WAIT):
                async for _ in stream:
                    pass

        replicas.hubs[leader].signal(signal.SIGKILL)
        error = await failure(drain())
        assert error.code is Code.UNAVAILABLE
        # The follower takes over (Lease), the agent reconnects to it, and a new session works.
        deadline = time.monotonic() + 120
        codes = []
        while True:
            try:
                fresh = aiter(
                    client(follower).execute_tty(exec_request(runtime_system.pods["shell"], ["true"]))
                )
                await asyncio.wait_for(anext(fresh), WAIT)
                break
            except ConnectError as exc:
                codes.append(exc.code)
            assert time.monotonic() < deadline, "no new session through the new leader within 120 s"
            await asyncio.sleep(1.0)
        assert set(codes) <= {Code.UNAVAILABLE}, codes
    finally:
        for found, http in opened:
            await found.close()
            await http.aclose()
        await replicas.stop()


# --- bidirectional streams through the hub (HTTP/2) ------------------------------------------------


@pytest.mark.parametrize("transport", ["connect-h2c", "grpc-h2c"])
async def test_exec_and_port_forward_streams_through_the_hub(
    clients: Clients, runtime_system: RuntimeSystem, transport: str
) -> None:
    """Full duplex through hub and tunnel: each echo arrives before the next input is sent."""
    client = clients(transport)
    outbox = Outbox()
    outbox.put(pb.ExecRequest(start=exec_request(runtime_system.pods["shell"], ["cat"])))
    responses = aiter(client.exec(outbox))
    assert await asyncio.wait_for(anext(responses), WAIT) == pb.ExecResponse()
    echoed = b""
    for word in (b"ping\n", b"pong\n"):
        outbox.put(pb.ExecRequest(stdin=word))
        async with asyncio.timeout(WAIT):
            while not echoed.endswith(word):
                echoed += (await anext(responses)).stdout
    outbox.put(pb.ExecRequest(close_stdin=True))
    exit_codes = []
    async with asyncio.timeout(WAIT):
        async for message in responses:
            if message.HasField("exit_code"):
                exit_codes.append(message.exit_code)
    outbox.end()
    assert exit_codes == [0]

    outbox = Outbox()
    start = pb.PortForwardRequest(
        cluster=CLUSTER, namespace=NAMESPACE, name=runtime_system.pods["web"], port=8080
    )
    outbox.put(pb.PortForwardStreamRequest(start=start))
    stream = aiter(client.port_forward_stream(outbox))
    assert await asyncio.wait_for(anext(stream), WAIT) == pb.PortForwardStreamResponse()
    outbox.put(pb.PortForwardStreamRequest(data=b"GET / HTTP/1.0\r\n\r\n"))
    answer = b""
    async with asyncio.timeout(WAIT):
        async for message in stream:
            answer += message.data
    outbox.end()
    assert answer.startswith(b"HTTP/1.0 200 OK")
