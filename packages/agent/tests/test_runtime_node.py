"""Exec, port-forward and PodLog through the agent against real Pods on the real test node.

The ``node`` fixture runs a single-node cluster (kube-apiserver, kubelet, containerd, runc,
CNI): the agent talks to its API server exactly as in production (WebSocket exec
``v5.channel.k8s.io``, the kubelet's port-forward, streamed logs), as the signed caller. Clients
call the agent directly, signed as the hub would; the same operations through the hub are in
``tests/e2e/test_runtime.py``.

Two agents: one with the default runtime limits, one with tight ones (two sessions per subject,
second-scale idle timeout and lifetime, short heartbeats and gap timeout) so limits and timeouts
are reached within a test. Bounds on waits are generous: the CI machine is a loaded 2-core box.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import AuditConfig, Identity, RuntimeConfig
from otterscale.runtime.v1 import runtime_pb2 as pb
from otterscale.runtime.v1.runtime_connect import RuntimeServiceClient
from otterscale.testing import AgentProcess, Node, Outbox, eventually

from .conftest import (
    ADMIN,
    CLUSTER,
    ClientFactory,
    _ensure_admin_binding,
    client_factory,
    start_agent,
    unique,
)

pytestmark = [pytest.mark.integration, pytest.mark.node]

NAMESPACE = "runtime-tests"
#: Seconds a test waits for output it caused; the node answers in milliseconds when idle.
WAIT = 60.0
TIGHT = RuntimeConfig(
    max_exec_sessions_per_subject=2,
    max_port_forward_sessions_per_subject=2,
    idle_timeout_seconds=3.0,
    max_lifetime_seconds=8.0,
    heartbeat_seconds=0.5,
    write_gap_timeout_seconds=0.5,
)

SLEEPER = ["python3", "-c", "import time\nwhile True: time.sleep(3600)"]
TICKER = ["python3", "-u", "-c", "import time\nn=0\nwhile True:\n print('tick', n); n+=1; time.sleep(0.2)"]
# The Pod's own address space: all interfaces of the Pod, its emptyDir /tmp.
WEB = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", "/tmp"]  # noqa: S104


@pytest.fixture(scope="module")
def cluster(node: Node) -> Iterator[dict[str, str]]:
    """A namespace with a shell pod, a log ticker, a web server, and RBAC for a viewer and a log reader."""
    cp = node.control_plane
    _ensure_admin_binding(cp)
    with contextlib.suppress(Exception):
        cp.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
    cp.wait_for(
        lambda: cp.request("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"),
        60,
        "service account",
    )
    # A second administrator (through ADMIN's group) for the per-subject limits.
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "otterscale-test-admins"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "Group", "name": ADMIN.groups[0], "apiGroup": "rbac.authorization.k8s.io"}],
        }
    )
    image = node.image("python")
    names = {"shell": unique("shell"), "ticker": unique("ticker"), "web": unique("web")}
    node.run_pod(names["shell"], image, SLEEPER, namespace=NAMESPACE, wait=False)
    node.run_pod(names["ticker"], image, TICKER, namespace=NAMESPACE, wait=False)
    node.run_pod(names["web"], image, WEB, namespace=NAMESPACE, wait=False)
    for name in names.values():
        node.wait_pod_ready(NAMESPACE, name)
    # Roles by what they grant on pods/exec: a WebSocket exec needs get and create on it.
    roles: dict[str, list[dict[str, Any]]] = {
        "log-reader": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]}],
        "exec-create-only": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]},
        ],
        "exec-get-only": [{"apiGroups": [""], "resources": ["pods", "pods/exec"], "verbs": ["get"]}],
        "exec": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["get", "create"]},
        ],
    }
    for role, rules in roles.items():
        cp.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": role, "namespace": NAMESPACE},
                "rules": rules,
            }
        )
    users = {"viewer": unique("viewer"), **{role.replace("-", "_"): unique(role) for role in roles}}
    bindings = [(users["viewer"], "ClusterRole", "view")]
    bindings += [(users[role.replace("-", "_")], "Role", role) for role in roles]
    for user, kind, role in bindings:
        cp.request(
            "POST",
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}/rolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": user},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
                "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
            },
        )
        cp.wait_for(
            lambda u=user: cp.request(
                "GET",
                f"/api/v1/namespaces/{NAMESPACE}/pods/{names['shell']}",
                headers={"Impersonate-User": u},
            ),
            60,
            "role binding in effect",
        )
    return {**names, **users}


def _agent(
    node: Node, directory: Path, runtime: RuntimeConfig, audit_file: Path | None = None
) -> contextlib.AbstractContextManager[AgentProcess]:
    """An agent process in front of the node with these runtime limits (and a file audit sink)."""
    sections: dict[str, Any] = {"runtime": runtime.model_dump(mode="json")}
    if audit_file is not None:
        sections["audit"] = AuditConfig(sink="file", file=audit_file).model_dump(mode="json")
    return start_agent(node.control_plane, directory, sections=sections)


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The node agent's audit trail (a file sink)."""
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def node_agent(
    node: Node, cluster: dict[str, str], audit_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    with _agent(node, tmp_path_factory.mktemp("node-agent"), RuntimeConfig(), audit_file) as agent:
        yield agent


@pytest.fixture(scope="module")
def tight_agent(
    node: Node, cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    with _agent(node, tmp_path_factory.mktemp("tight-agent"), TIGHT) as agent:
        yield agent


@pytest_asyncio.fixture
async def clients(node_agent: AgentProcess) -> AsyncIterator[ClientFactory]:
    async with client_factory(node_agent.url) as factory:
        yield factory


def runtime(clients: ClientFactory, identity: Identity = ADMIN, **kwargs: Any) -> RuntimeServiceClient:
    client: RuntimeServiceClient = clients(identity, service=RuntimeServiceClient, **kwargs)
    return client


class Session:
    """An ExecuteTTY stream read in the background: output collected, the end recorded."""

    def __init__(self, client: RuntimeServiceClient, request: pb.ExecuteTTYRequest) -> None:
        self.client = client
        self.stream = aiter(client.execute_tty(request))
        self.id = ""
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.heartbeats = 0
        self.last: pb.ExecuteTTYResponse | None = None
        self.error: ConnectError | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Session:
        first = await asyncio.wait_for(anext(self.stream), WAIT)
        assert first.session_id.startswith(f"{CLUSTER}.")
        self.id = first.session_id
        self._task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for message in self.stream:
                self.stdout += message.stdout
                self.stderr += message.stderr
                if message.HasField("exit_code"):
                    self.last = message
                if not (message.stdout or message.stderr or message.HasField("exit_code")):
                    self.heartbeats += 1
                self._changed.set()
        except ConnectError as exc:
            self.error = exc
        finally:
            self._changed.set()

    async def wait_for(self, check: Any, what: str, limit: float = WAIT) -> None:
        deadline = time.monotonic() + limit
        while not check():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{what} not seen within {limit:.0f}s; stdout so far {bytes(self.stdout)!r}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def ended(self, limit: float = WAIT) -> None:
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), limit)

    async def write(self, data: bytes, offset: int | None = None, close: bool = False) -> None:
        request = pb.WriteTTYRequest(session_id=self.id, stdin=data, close_stdin=close)
        if offset is not None:
            request.offset = offset
        await self.client.write_tty(request)

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.stream.aclose()  # type: ignore[attr-defined]


def exec_request(pod: str, command: list[str], **fields: Any) -> pb.ExecuteTTYRequest:
    return pb.ExecuteTTYRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pod, command=command, **fields)


async def failure(call: Any) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        await call
    return caught.value


# --- exec --------------------------------------------------------------------------------------


async def test_exec_output_and_exit_codes(
    clients: ClientFactory, cluster: dict[str, str], transport: str
) -> None:
    client = runtime(clients, transport=transport)
    script = "echo out; echo err >&2; exit 3"
    session = await Session(client, exec_request(cluster["shell"], ["sh", "-c", script], stdin=False)).start()
    await session.ended()
    assert session.error is None
    assert bytes(session.stdout) == b"out\n"
    assert bytes(session.stderr) == b"err\n"
    assert session.last is not None
    assert session.last.exit_code == 3
    assert "exit code 3" in session.last.message
    ok = await Session(client, exec_request(cluster["shell"], ["true"], stdin=False)).start()
    await ok.ended()
    assert ok.last is not None
    assert (ok.last.exit_code, ok.last.message) == (0, "")


async def test_exec_echo_round_trip_and_stdin_close(clients: ClientFactory, cluster: dict[str, str]) -> None:
    """`cat` echoes what is written, in offset order even when the writes overtake each other,
    and ends when stdin is closed."""
    client = runtime(clients, transport="connect-h2c")
    session = await Session(client, exec_request(cluster["shell"], ["cat"])).start()
    await session.write(b"hello\n", offset=0)
    await session.wait_for(lambda: session.stdout == b"hello\n", "the echo")
    # The second chunk is sent first: the agent holds it until the first arrives.
    later = asyncio.ensure_future(session.write(b"two\n", offset=10))
    await session.write(b"one\n", offset=6)
    await later
    await session.write(b"one\n", offset=6)  # a retry: acknowledged, not applied again
    await session.write(b"", offset=14, close=True)
    await session.ended()
    assert bytes(session.stdout) == b"hello\none\ntwo\n"
    assert session.last is not None
    assert session.last.exit_code == 0
    error = await failure(session.write(b"late", offset=14))
    assert error.code is Code.NOT_FOUND  # the session ended with the command


async def test_exec_tty_size_and_resize(clients: ClientFactory, cluster: dict[str, str]) -> None:
    """The initial size and a resize reach the terminal. Kubernetes applies sizes asynchronously
    (the runtime creates the terminal, then reads the resize channel), so ``stty size`` is asked
    until the size shows; the size is never set any other way."""
    client = runtime(clients, transport="grpc-h2c")
    request = exec_request(cluster["shell"], ["sh"], tty=True, rows=20, cols=77)
    session = await Session(client, request).start()

    async def size_becomes(expected: bytes) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            seen = len(session.stdout)
            await session.write(b"stty size\n")
            await session.wait_for(
                lambda seen=seen: session.stdout.count(b"\r\n", seen) >= 2, "stty's answer"
            )
            if expected in session.stdout[seen:]:
                return
            assert time.monotonic() < deadline, f"the size never became {expected!r}"
            await asyncio.sleep(0.2)

    await size_becomes(b"20 77")
    await client.resize_tty(pb.ResizeTTYRequest(session_id=session.id, rows=33, cols=99))
    await size_becomes(b"33 99")
    await session.write(b"exit 4\n")
    await session.ended()
    assert session.last is not None
    assert session.last.exit_code == 4


async def test_exec_refusals_on_a_running_session(clients: ClientFactory, cluster: dict[str, str]) -> None:
    client = runtime(clients)
    quiet = await Session(client, exec_request(cluster["shell"], ["sleep", "60"], stdin=False)).start()
    try:
        error = await failure(quiet.write(b"x"))
        assert error.code is Code.FAILED_PRECONDITION
        assert "without stdin" in error.message
        error = await failure(client.resize_tty(pb.ResizeTTYRequest(session_id=quiet.id, rows=10, cols=10)))
        assert error.code is Code.FAILED_PRECONDITION
        assert "no terminal" in error.message
    finally:
        await quiet.cancel()
    reader = await Session(client, exec_request(cluster["shell"], ["cat"])).start()
    try:
        error = await failure(reader.write(b"y" * (64 * 1024 + 1)))
        assert error.code is Code.RESOURCE_EXHAUSTED
        assert "runtime.max_write_bytes" in error.message
    finally:
        await reader.cancel()


async def test_hijack_attempts_are_not_found(clients: ClientFactory, cluster: dict[str, str]) -> None:
    """Another subject, the same subject with other groups, another cluster's prefix, a guessed id:
    all not_found, none reaches the victim's shell."""
    victim = await Session(runtime(clients), exec_request(cluster["shell"], ["cat"])).start()
    try:
        token = victim.id.split(".", 1)[1]
        attempts = [
            (runtime(clients, Identity("mallory", ADMIN.groups)), victim.id),
            (runtime(clients, Identity(ADMIN.subject, ("other-group",))), victim.id),
            (runtime(clients), f"elsewhere.{token}"),
            (runtime(clients), f"{CLUSTER}.{'A' * 22}"),
        ]
        for client, session_id in attempts:
            error = await failure(client.write_tty(pb.WriteTTYRequest(session_id=session_id, stdin=b"id\n")))
            assert error.code is Code.NOT_FOUND
            assert token not in error.message
            error = await failure(
                client.resize_tty(pb.ResizeTTYRequest(session_id=session_id, rows=5, cols=5))
            )
            assert error.code is Code.NOT_FOUND
        await victim.write(b"mine\n")
        await victim.wait_for(lambda: victim.stdout == b"mine\n", "the owner's echo")
        assert victim.stdout == b"mine\n"  # nothing the others sent arrived
    finally:
        await victim.cancel()


async def test_view_user_cannot_exec_or_port_forward_but_a_log_reader_reads(
    clients: ClientFactory, cluster: dict[str, str]
) -> None:
    viewer = runtime(clients, Identity(cluster["viewer"]), transport="connect-h2c")
    with pytest.raises(ConnectError) as caught:
        await anext(aiter(viewer.execute_tty(exec_request(cluster["shell"], ["id"]))))
    assert caught.value.code is Code.PERMISSION_DENIED
    request = pb.PortForwardRequest(cluster=CLUSTER, namespace=NAMESPACE, name=cluster["web"], port=8080)
    with pytest.raises(ConnectError) as caught:
        await anext(aiter(viewer.port_forward(request)))
    assert caught.value.code is Code.PERMISSION_DENIED
    reader = runtime(clients, Identity(cluster["log_reader"]))
    log = b""
    async for message in reader.pod_log(
        pb.PodLogRequest(cluster=CLUSTER, namespace=NAMESPACE, name=cluster["ticker"], tail_lines=3)
    ):
        log += message.data
    assert log.count(b"tick") == 3
    with pytest.raises(ConnectError) as caught:
        await anext(aiter(reader.execute_tty(exec_request(cluster["ticker"], ["id"]))))
    assert caught.value.code is Code.PERMISSION_DENIED


async def test_exec_needs_get_and_create_on_pods_exec(
    clients: ClientFactory, cluster: dict[str, str]
) -> None:
    # The stream is a WebSocket upgrade (a GET): kube-apiserver checks get, 1.35+ also create.
    # Refused before the stream, naming what is missing, rather than as the upgrade's bare 403.
    for user, missing in (("exec_create_only", "may not get pods/exec"), ("exec_get_only", "may not create")):
        client = runtime(clients, Identity(cluster[user]), transport="connect-h2c")
        with pytest.raises(ConnectError) as caught:
            await anext(aiter(client.execute_tty(exec_request(cluster["shell"], ["id"]))))
        assert caught.value.code is Code.PERMISSION_DENIED, user
        assert missing in caught.value.message, caught.value.message
    allowed = runtime(clients, Identity(cluster["exec"]), transport="connect-h2c")
    session = await Session(allowed, exec_request(cluster["shell"], ["id", "-u"])).start()
    await session.ended()
    assert session.error is None, session.error
    assert session.last is not None
    assert session.last.exit_code == 0, session.last
    assert session.stdout.strip().isdigit(), bytes(session.stdout)


async def test_audit_events_at_start_and_end_without_stdin(
    clients: ClientFactory, cluster: dict[str, str], audit_file: Path
) -> None:
    client = runtime(clients)
    session = await Session(client, exec_request(cluster["shell"], ["cat"])).start()
    secret = b"s3cret-typed-into-the-shell\n"
    await session.write(secret, offset=0, close=True)
    await session.ended()
    text = audit_file.read_text()
    events = [json.loads(line) for line in text.splitlines()]
    mine = [e for e in events if e["name"] == cluster["shell"] and e.get("argv") == ["cat"]]
    starts = [e for e in mine if e["phase"] == "start"]
    ends = [e for e in mine if e["phase"] == "end" and e["session"] == starts[-1]["session"]]
    assert len(ends) == 1
    end = ends[0]
    assert (end["component"], end["service"], end["verb"], end["subject"], end["groups"]) == (
        "agent",
        "otterscale.runtime.v1.RuntimeService",
        "ExecuteTTY",
        ADMIN.subject,
        list(ADMIN.groups),
    )
    assert (end["cluster"], end["namespace"], end["container"], end["kind"], end["tty"]) == (
        CLUSTER,
        NAMESPACE,
        "main",
        "exec",
        False,
    )
    assert (end["exit_code"], end["code"], end["bytes_in"], end["bytes_out"]) == (
        0,
        "ok",
        len(secret),
        len(secret),
    )
    assert end["duration_ms"] > 0
    token = session.id.split(".", 1)[1]
    assert token not in text  # only the short hash, never the id
    assert "s3cret" not in text  # never stdin (nor output)


# --- limits and timeouts ----------------------------------------------------------------------------


async def test_per_subject_limit_and_its_release(tight_agent: AgentProcess, cluster: dict[str, str]) -> None:
    async with client_factory(tight_agent.url) as factory:
        client = runtime(factory, transport="connect-h2c")
        first = await Session(client, exec_request(cluster["shell"], ["cat"])).start()
        second = await Session(client, exec_request(cluster["shell"], ["cat"])).start()
        with pytest.raises(ConnectError) as caught:
            await anext(aiter(client.execute_tty(exec_request(cluster["shell"], ["cat"]))))
        assert caught.value.code is Code.RESOURCE_EXHAUSTED
        assert "runtime.max_exec_sessions_per_subject" in caught.value.message
        # Another subject has its own budget.
        other = await Session(
            runtime(factory, Identity(f"{ADMIN.subject}-2", ADMIN.groups)),
            exec_request(cluster["shell"], ["true"]),
        ).start()
        await other.ended()
        await first.cancel()  # the client goes away: the slot is free again
        # The agent learns of the cancel through the HTTP/2 reset; poll for the slot.
        deadline = time.monotonic() + WAIT
        codes = []
        while True:
            try:
                third = await Session(client, exec_request(cluster["shell"], ["cat"])).start()
                break
            except ConnectError as exc:
                codes.append(exc.code)
            assert time.monotonic() < deadline, "the slot of the cancelled session was never freed"
            await asyncio.sleep(0.2)
        assert set(codes) <= {Code.RESOURCE_EXHAUSTED}
        await third.cancel()
        await second.cancel()
        # The next test on this agent needs both slots again.
        await sessions_released(tight_agent)


async def sessions_released(agent: AgentProcess) -> None:
    """Wait until the agent holds no exec session. Inside Envoy the agent learns that a client
    cancelled its stream a little later than the cancel returns (pyvoy's disconnect poll, or the
    next heartbeat failing), so a test that needs the slots back waits for the gauge."""

    async def none_open() -> bool:
        return not (await agent.ametrics()).value("otterscale_agent_runtime_sessions_active", kind="exec")

    await eventually(none_open, WAIT, "the release of the cancelled exec sessions")


async def test_idle_timeout_and_heartbeats(tight_agent: AgentProcess, cluster: dict[str, str]) -> None:
    async with client_factory(tight_agent.url) as factory:
        session = await Session(runtime(factory), exec_request(cluster["shell"], ["cat"])).start()
        started = time.monotonic()
        await session.ended(limit=WAIT)
        assert session.error is not None
        assert session.error.code is Code.DEADLINE_EXCEEDED
        assert "runtime.idle_timeout_seconds" in session.error.message
        assert time.monotonic() - started >= TIGHT.idle_timeout_seconds - 0.5
        assert session.heartbeats >= 2  # every 0.5 s while idle


async def test_activity_keeps_a_session_until_its_lifetime(
    tight_agent: AgentProcess, cluster: dict[str, str]
) -> None:
    async with client_factory(tight_agent.url) as factory:
        session = await Session(runtime(factory), exec_request(cluster["shell"], ["cat"])).start()
        offset = 0
        while session.error is None and session.last is None:
            with contextlib.suppress(ConnectError):
                await session.write(b".", offset=offset)
                offset += 1
            await asyncio.sleep(1.0)  # less than the idle timeout: only the lifetime can end it
        await session.ended()
        assert session.error is not None
        assert session.error.code is Code.DEADLINE_EXCEEDED
        assert "runtime.max_lifetime_seconds" in session.error.message


async def test_a_write_gap_is_aborted(tight_agent: AgentProcess, cluster: dict[str, str]) -> None:
    async with client_factory(tight_agent.url) as factory:
        session = await Session(runtime(factory), exec_request(cluster["shell"], ["cat"])).start()
        try:
            error = await failure(session.write(b"later", offset=100))
            assert error.code is Code.ABORTED
            assert "write from offset 0 again" in error.message
            await session.write(b"now\n", offset=0)
            await session.wait_for(lambda: session.stdout == b"now\n", "the echo after the gap")
        finally:
            await session.cancel()


async def test_agent_shutdown_ends_sessions_with_unavailable(
    node: Node, cluster: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM (what Kubernetes sends a Pod): open sessions end with unavailable, not cut off."""
    with _agent(node, tmp_path, RuntimeConfig()) as agent:
        async with client_factory(agent.url) as factory:
            session = await Session(runtime(factory), exec_request(cluster["shell"], ["cat"])).start()
            await asyncio.to_thread(agent.stop)
            await session.ended()
            assert session.error is not None
            assert session.error.code is Code.UNAVAILABLE
            assert "shutting down" in session.error.message


async def test_exec_over_v4_where_the_server_offers_no_v5(node: Node, cluster: dict[str, str]) -> None:
    """The fallback for API servers older than 1.30 (``v4.channel.k8s.io`` only): output and the
    exit code arrive over v4, and the connection says it cannot close stdin (v4 has no way to),
    so the service refuses close_stdin instead of losing it. The node's API server speaks both;
    offering only v4 makes it answer as an old one would."""
    from otterscale.agent import load_connection
    from otterscale.agent._kube import KubeClient
    from otterscale.agent._runtime import SessionKind
    from otterscale.agent._runtime._channel import ERROR, EXEC_V4, STDOUT, exit_status
    from otterscale.agent._runtime._connection import ExecConnection
    from otterscale.agent._runtime._pods import command_params, pod_path
    from otterscale.agent._runtime._sessions import Owner, Session

    kube = await KubeClient.open(await load_connection(node.kubeconfig, {}))
    try:
        params = [("container", "main"), *command_params(["sh", "-c", "echo over-v4; exit 6"])]
        ws = await kube.websocket(
            pod_path(NAMESPACE, cluster["shell"], "exec"),
            params=[*params, ("stdout", "true"), ("stderr", "true")],
            protocols=(EXEC_V4,),
            caller=ADMIN,
        )
        sock = ws.get_extra_info("socket")
        session = Session("test.x", SessionKind.EXEC, Owner.of(ADMIN), NAMESPACE, cluster["shell"])
        connection = ExecConnection(ws, session)
        try:
            assert connection.protocol == EXEC_V4
            assert not connection.can_close_stdin
            assert "cannot close stdin" in connection.close_refusal
            stdout, status = b"", None
            async with asyncio.timeout(WAIT):
                async for channel, payload in connection.frames():
                    if channel == STDOUT:
                        stdout += payload
                    elif channel == ERROR:
                        status = exit_status(payload)
        finally:
            await ws.close()
    finally:
        await kube.close()

    # The TLS shutdown of the stream's connection ends on later turns of this loop: wait for its
    # socket to close, so no transport of this test is left to a later test's garbage collection.
    async def socket_closed() -> bool:
        return sock is None or sock.fileno() == -1

    await eventually(socket_closed, WAIT, "the exec connection's socket closing", every=0.05)
    assert stdout == b"over-v4\n"
    assert status is not None
    assert status.exit_code == 6


# --- port-forward ---------------------------------------------------------------------------------


async def _port_forward(
    client: RuntimeServiceClient, pod: str, port: int, payload: bytes
) -> tuple[bytes, ConnectError | None]:
    stream = aiter(
        client.port_forward(pb.PortForwardRequest(cluster=CLUSTER, namespace=NAMESPACE, name=pod, port=port))
    )
    first = await asyncio.wait_for(anext(stream), WAIT)
    received = bytearray()
    try:
        if payload:
            await client.write_port_forward(
                pb.WritePortForwardRequest(session_id=first.session_id, data=payload, offset=0)
            )
        async for message in stream:
            received += message.data
    except ConnectError as exc:
        return bytes(received), exc
    return bytes(received), None


async def test_port_forward_to_an_http_server(
    clients: ClientFactory, cluster: dict[str, str], transport: str
) -> None:
    client = runtime(clients, transport=transport)
    answer, error = await asyncio.wait_for(
        _port_forward(client, cluster["web"], 8080, b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n"), WAIT
    )
    assert error is None  # the server closed the connection after answering: OK
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Directory listing" in answer


async def test_port_forward_to_a_closed_port_reports_the_kubelet(
    clients: ClientFactory, cluster: dict[str, str]
) -> None:
    _, error = await asyncio.wait_for(_port_forward(runtime(clients), cluster["web"], 9, b""), WAIT)
    assert error is not None
    assert error.code in (Code.FAILED_PRECONDITION, Code.UNAVAILABLE)
    assert "port 9" in error.message  # the kubelet's own text


async def test_port_forward_close_write_is_refused_honestly(
    clients: ClientFactory, cluster: dict[str, str]
) -> None:
    client = runtime(clients)
    stream = aiter(
        client.port_forward(
            pb.PortForwardRequest(cluster=CLUSTER, namespace=NAMESPACE, name=cluster["web"], port=8080)
        )
    )
    first = await asyncio.wait_for(anext(stream), WAIT)
    try:
        error = await failure(
            client.write_port_forward(
                pb.WritePortForwardRequest(session_id=first.session_id, data=b"x", close_write=True)
            )
        )
        assert error.code is Code.FAILED_PRECONDITION
        assert "cannot half-close" in error.message
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


# --- logs ----------------------------------------------------------------------------------------


async def test_log_follow_sees_new_lines_and_heartbeats(
    tight_agent: AgentProcess, cluster: dict[str, str], transport: str
) -> None:
    async with client_factory(tight_agent.url) as factory:
        client = runtime(factory, transport=transport)
        request = pb.PodLogRequest(
            cluster=CLUSTER,
            namespace=NAMESPACE,
            name=cluster["ticker"],
            follow=True,
            tail_lines=0,
            timestamps=True,
        )
        seen: list[int] = []
        async with asyncio.timeout(WAIT):
            async for message in client.pod_log(request):
                if message.data:
                    assert message.container == "main"
                    for line in message.data.decode().splitlines():
                        stamp, text = line.split(" ", 1)
                        assert stamp.endswith("Z")  # timestamps=true: RFC 3339 first
                        seen.append(int(text.split()[1]))
                if len(seen) >= 3:
                    break
        # tail_lines=0: nothing written before the call; then consecutive new lines.
        assert seen[1:] == [seen[0] + 1, seen[0] + 2]


async def test_an_idle_log_follow_carries_heartbeats(
    tight_agent: AgentProcess, cluster: dict[str, str]
) -> None:
    """The shell pod never writes: a followed log of it carries only empty messages, one per
    heartbeat interval (0.5 s here), so proxies in between keep the stream open."""
    async with client_factory(tight_agent.url) as factory:
        client = runtime(factory)
        request = pb.PodLogRequest(
            cluster=CLUSTER, namespace=NAMESPACE, name=cluster["shell"], follow=True, tail_lines=0
        )
        seen: list[pb.PodLogResponse] = []
        async with asyncio.timeout(WAIT):
            async for message in client.pod_log(request):
                seen.append(message)
                if len(seen) >= 3:
                    break
        assert all(m == pb.PodLogResponse() for m in seen), seen


async def test_log_of_every_container(clients: ClientFactory, node: Node, cluster: dict[str, str]) -> None:
    name = unique("pair")
    cp = node.control_plane
    image = node.image("python")
    cp.request(
        "POST",
        f"/api/v1/namespaces/{NAMESPACE}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": c,
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": [
                            "python3",
                            "-u",
                            "-c",
                            f"print('hello from {c}')\nimport time\ntime.sleep(3600)",
                        ],
                    }
                    for c in ("first", "second")
                ],
            },
        },
    )
    node.wait_pod_ready(NAMESPACE, name)
    client = runtime(clients)
    error = await failure(
        anext(aiter(client.pod_log(pb.PodLogRequest(cluster=CLUSTER, namespace=NAMESPACE, name=name))))
    )
    assert error.code is Code.INVALID_ARGUMENT
    by_container: dict[str, bytes] = {}

    def complete() -> bool:
        return all(by_container.get(c, b"").endswith(b"\n") for c in ("first", "second"))

    for _ in range(20):  # a container's first line may not be in its log the instant it is Ready
        by_container.clear()
        async for message in client.pod_log(
            pb.PodLogRequest(cluster=CLUSTER, namespace=NAMESPACE, name=name, all_containers=True)
        ):
            by_container[message.container] = by_container.get(message.container, b"") + message.data
        if complete():
            break
        await asyncio.sleep(0.5)
    assert by_container == {"first": b"hello from first\n", "second": b"hello from second\n"}
    error = await failure(
        anext(
            aiter(
                client.pod_log(
                    pb.PodLogRequest(
                        cluster=CLUSTER, namespace=NAMESPACE, name=name, container="first", previous=True
                    )
                )
            )
        )
    )
    assert error.code is Code.INVALID_ARGUMENT  # Kubernetes: no previous terminated container


# --- bidirectional streams (HTTP/2 clients) ---------------------------------------------------------


@pytest.mark.parametrize("transport", ["connect-h2c", "grpc-h2c"])
async def test_exec_as_one_bidirectional_stream(
    clients: ClientFactory, cluster: dict[str, str], transport: str
) -> None:
    client = runtime(clients, transport=transport)
    outbox = Outbox()
    outbox.put(pb.ExecRequest(start=exec_request(cluster["shell"], ["cat"])))
    responses = aiter(client.exec(outbox))
    started = await asyncio.wait_for(anext(responses), WAIT)
    assert started == pb.ExecResponse()  # empty: the command runs
    echoed = b""
    for word in (b"one\n", b"two\n"):  # each echo arrives before the next word is sent: full duplex
        outbox.put(pb.ExecRequest(stdin=word))
        async with asyncio.timeout(WAIT):
            while not echoed.endswith(word):
                echoed += (await anext(responses)).stdout
    outbox.put(pb.ExecRequest(close_stdin=True))
    last = None
    async with asyncio.timeout(WAIT):
        async for message in responses:
            if message.HasField("exit_code"):
                last = message
    outbox.end()
    assert echoed == b"one\ntwo\n"
    assert last is not None
    assert last.exit_code == 0


async def test_exec_stream_resize_and_refusals(clients: ClientFactory, cluster: dict[str, str]) -> None:
    client = runtime(clients, transport="grpc-h2c")
    error = await failure(anext(aiter(client.exec(_once(pb.ExecRequest(stdin=b"x"))))))
    assert error.code is Code.INVALID_ARGUMENT
    assert "first message of the stream must carry start" in error.message
    outbox = Outbox()
    outbox.put(pb.ExecRequest(start=exec_request(cluster["shell"], ["sh"], tty=True, rows=10, cols=20)))
    responses = aiter(client.exec(outbox))
    await asyncio.wait_for(anext(responses), WAIT)
    outbox.put(pb.ExecRequest(resize=pb.TerminalSize(rows=0, cols=5)))  # invalid: ends the session

    async def drain() -> None:
        async with asyncio.timeout(WAIT):
            async for _ in responses:
                pass

    error = await failure(drain())
    outbox.end()
    assert error.code is Code.INVALID_ARGUMENT
    assert "rows must be between 1 and 65535" in error.message


async def _once(message: Any) -> Any:
    yield message


async def test_port_forward_as_one_bidirectional_stream(
    clients: ClientFactory, cluster: dict[str, str]
) -> None:
    client = runtime(clients, transport="connect-h2c")
    outbox = Outbox()
    outbox.put(
        pb.PortForwardStreamRequest(
            start=pb.PortForwardRequest(cluster=CLUSTER, namespace=NAMESPACE, name=cluster["web"], port=8080)
        )
    )
    responses = aiter(client.port_forward_stream(outbox))
    assert await asyncio.wait_for(anext(responses), WAIT) == pb.PortForwardStreamResponse()
    outbox.put(pb.PortForwardStreamRequest(data=b"GET / HTTP/1.0\r\n\r\n"))
    answer = b""
    async with asyncio.timeout(WAIT):
        async for message in responses:
            answer += message.data
    outbox.end()
    assert answer.startswith(b"HTTP/1.0 200 OK")
