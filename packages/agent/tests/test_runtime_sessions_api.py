"""Exec, port-forward and PodLog through the agent before any stream opens, on a real control plane.

The session's control plane has no kubelet, so Pods never run here: these tests cover what is
decided before Kubernetes opens a stream (validation, the pod and container, the permission
check as the caller, the pod's state) and that a refused start leaves no session behind. The
streams themselves are tested against a real node in ``tests/e2e/test_runtime.py``.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import Identity
from otterscale.runtime.v1 import runtime_pb2 as pb
from otterscale.runtime.v1.runtime_connect import RuntimeServiceClient
from otterscale.testing import AgentProcess, ControlPlane

from .conftest import CLUSTER, ClientFactory, unique

pytestmark = pytest.mark.integration


def pod(name: str, containers: list[str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"containers": [{"name": c, "image": "registry.invalid/app:1"} for c in containers]},
    }


def runtime(
    make_client: ClientFactory, identity: Identity | None = None, **kwargs: Any
) -> RuntimeServiceClient:
    if identity is not None:
        kwargs["identity"] = identity
    client: RuntimeServiceClient = make_client(service=RuntimeServiceClient, **kwargs)
    return client


async def stream_error(stream: Any) -> tuple[ConnectError, list[Any]]:
    received: list[Any] = []

    async def drain() -> None:
        async for message in stream:
            received.append(message)

    with pytest.raises(ConnectError) as caught:
        await drain()
    return caught.value, received


async def unary_error(call: Any) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        await call
    return caught.value


def scrape(agent: AgentProcess) -> tuple[int, str, str]:
    """Status, content type and text of the agent's /metrics (stdlib: a real HTTP client)."""
    with urllib.request.urlopen(agent.url + "/metrics", timeout=10) as resp:  # noqa: S310 - loopback
        return resp.status, resp.headers["Content-Type"], resp.read().decode()


@pytest.fixture
def pods(control_plane: ControlPlane, namespace: str) -> dict[str, str]:
    names = {"single": unique("single"), "multi": unique("multi"), "annotated": unique("annotated")}
    control_plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod(names["single"], ["app"]))
    control_plane.request(
        "POST", f"/api/v1/namespaces/{namespace}/pods", pod(names["multi"], ["app", "sidecar"])
    )
    control_plane.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/pods",
        pod(names["annotated"], ["app", "sidecar"], {"kubectl.kubernetes.io/default-container": "sidecar"}),
    )
    return names


@pytest.fixture
def viewer(control_plane: ControlPlane, namespace: str) -> Identity:
    user = Identity(unique("viewer"))
    control_plane.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "User", "name": user.subject, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    )
    control_plane.wait_for(
        lambda: control_plane.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods", headers={"Impersonate-User": user.subject}
        ),
        what="view binding in effect",
    )
    return user


def exec_request(pod_namespace: str, pod_name: str, **fields: Any) -> pb.ExecuteTTYRequest:
    values: dict[str, Any] = {
        "cluster": CLUSTER,
        "namespace": pod_namespace,
        "name": pod_name,
        "command": ["sh"],
    }
    values.update(fields)
    return pb.ExecuteTTYRequest(**values)


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"command": []}, Code.INVALID_ARGUMENT, "command is required"),
        ({"name": ""}, Code.INVALID_ARGUMENT, "name is required"),
        ({"namespace": ""}, Code.INVALID_ARGUMENT, "namespace is required"),
        ({"rows": 70000, "cols": 80, "tty": True}, Code.INVALID_ARGUMENT, "rows must be between 1 and 65535"),
        ({"cluster": "elsewhere"}, Code.NOT_FOUND, "serves cluster"),
        ({"name": "no-such-pod"}, Code.NOT_FOUND, "not found"),
        ({"container": "nope"}, Code.INVALID_ARGUMENT, "container 'nope' is not in pod"),
    ],
)
async def test_exec_refusals_before_the_stream(
    make_client: ClientFactory,
    namespace: str,
    pods: dict[str, str],
    fields: dict[str, Any],
    code: Code,
    fragment: str,
) -> None:
    request = exec_request(namespace, pods["single"], **fields)
    error, received = await stream_error(runtime(make_client).execute_tty(request))
    assert error.code is code, error.message
    assert fragment in error.message
    assert received == []  # no session id for a start that failed


async def test_exec_container_choice_like_kubectl(
    make_client: ClientFactory, namespace: str, pods: dict[str, str]
) -> None:
    client = runtime(make_client)
    error, _ = await stream_error(client.execute_tty(exec_request(namespace, pods["multi"])))
    assert error.code is Code.INVALID_ARGUMENT
    assert "several containers" in error.message
    assert "app, sidecar" in error.message
    # The annotation, the only container, or a named one: all get past the choice (and then stop
    # because the pod is not scheduled: there is no kubelet here).
    for name, container in ((pods["annotated"], ""), (pods["single"], ""), (pods["multi"], "sidecar")):
        error, _ = await stream_error(client.execute_tty(exec_request(namespace, name, container=container)))
        assert error.code is Code.FAILED_PRECONDITION, error.message
        assert "not scheduled" in error.message


async def test_view_user_cannot_exec_or_port_forward(
    make_client: ClientFactory,
    namespace: str,
    pods: dict[str, str],
    viewer: Identity,
    agent_server: AgentProcess,
) -> None:
    refusals = "otterscale_agent_runtime_refusals_total"
    before = agent_server.metrics().get(refusals, kind="exec", reason="access_denied")
    client = runtime(make_client, viewer, transport="grpc-h2c")
    error, received = await stream_error(client.execute_tty(exec_request(namespace, pods["single"])))
    assert error.code is Code.PERMISSION_DENIED
    assert "may not get or create pods/exec" in error.message
    assert received == []
    error, received = await stream_error(
        client.port_forward(
            pb.PortForwardRequest(cluster=CLUSTER, namespace=namespace, name=pods["single"], port=80)
        )
    )
    assert error.code is Code.PERMISSION_DENIED
    assert "may not get or create pods/portforward" in error.message
    after = agent_server.metrics().get(refusals, kind="exec", reason="access_denied")
    assert after == before + 1


async def test_failed_starts_leave_no_session_behind(
    make_client: ClientFactory, namespace: str, pods: dict[str, str], agent_server: AgentProcess
) -> None:
    client = runtime(make_client, transport="connect-h2c")
    # More failed starts than one subject may hold sessions: each frees its slot.
    for _ in range(12):
        error, _ = await stream_error(client.execute_tty(exec_request(namespace, pods["single"])))
        assert error.code is Code.FAILED_PRECONDITION
    assert agent_server.metrics().value("otterscale_agent_runtime_sessions_active", kind="exec") == 0


async def test_writes_to_unknown_sessions_are_not_found_without_the_id(make_client: ClientFactory) -> None:
    client = runtime(make_client)
    session_id = f"{CLUSTER}.AAAAAAAAAAAAAAAAAAAAAA"
    for call in (
        client.write_tty(pb.WriteTTYRequest(session_id=session_id, stdin=b"x")),
        client.resize_tty(pb.ResizeTTYRequest(session_id=session_id, rows=10, cols=10)),
        client.write_port_forward(pb.WritePortForwardRequest(session_id=session_id, data=b"x")),
        client.write_tty(pb.WriteTTYRequest(session_id="", stdin=b"x")),
    ):
        error = await unary_error(call)
        assert error.code is Code.NOT_FOUND
        assert "AAAAAAAA" not in error.message


@pytest.mark.parametrize(("rows", "cols"), [(0, 10), (10, 0), (70000, 10)])
async def test_resize_dimensions(make_client: ClientFactory, rows: int, cols: int) -> None:
    error = await unary_error(
        runtime(make_client).resize_tty(pb.ResizeTTYRequest(session_id=f"{CLUSTER}.x", rows=rows, cols=cols))
    )
    assert error.code is Code.INVALID_ARGUMENT
    assert "between 1 and 65535" in error.message


@pytest.mark.parametrize("port", [0, -1, 65536])
async def test_port_forward_port_range(
    make_client: ClientFactory, namespace: str, pods: dict[str, str], port: int
) -> None:
    request = pb.PortForwardRequest(cluster=CLUSTER, namespace=namespace, name=pods["single"], port=port)
    error, _ = await stream_error(runtime(make_client).port_forward(request))
    assert error.code is Code.INVALID_ARGUMENT
    assert "port must be between 1 and 65535" in error.message


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"name": "no-such-pod"}, Code.NOT_FOUND, "not found"),
        ({"container": "app", "all_containers": True}, Code.INVALID_ARGUMENT, "not both"),
        ({"since_seconds": 0}, Code.INVALID_ARGUMENT, "since_seconds must be at least 1"),
        ({"tail_lines": -5}, Code.INVALID_ARGUMENT, "tail_lines must not be negative"),
    ],
)
async def test_pod_log_refusals(
    make_client: ClientFactory,
    namespace: str,
    pods: dict[str, str],
    fields: dict[str, Any],
    code: Code,
    fragment: str,
) -> None:
    values: dict[str, Any] = {"cluster": CLUSTER, "namespace": namespace, "name": pods["single"]}
    values.update(fields)
    error, received = await stream_error(runtime(make_client).pod_log(pb.PodLogRequest(**values)))
    assert error.code is code, error.message
    assert fragment in error.message
    assert received == []


async def test_pod_log_needs_a_container_choice(
    make_client: ClientFactory, namespace: str, pods: dict[str, str]
) -> None:
    request = pb.PodLogRequest(cluster=CLUSTER, namespace=namespace, name=pods["multi"])
    error, _ = await stream_error(runtime(make_client).pod_log(request))
    assert error.code is Code.INVALID_ARGUMENT
    assert "app, sidecar" in error.message


def test_agent_metrics_endpoint(agent_server: AgentProcess) -> None:
    status, content_type, text = scrape(agent_server)
    assert status == 200
    assert content_type.startswith("text/plain")
    for family in (
        "otterscale_agent_runtime_sessions_active",
        "otterscale_agent_runtime_session_seconds",
        "otterscale_agent_runtime_bytes_total",
        "otterscale_agent_runtime_refusals_total",
        "otterscale_agent_log_streams_active",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in text


async def _messages(*items: Any) -> Any:
    for item in items:
        yield item


async def test_bidirectional_streams_are_signed_and_checked(
    make_client: ClientFactory, namespace: str
) -> None:
    """The identity check and the error boundary cover request streams too (connectrpc skips an
    interceptor for a call shape it does not implement)."""
    unsigned: RuntimeServiceClient = make_client(
        identity=None, service=RuntimeServiceClient, transport="grpc-h2c"
    )
    start = pb.ExecRequest(start=exec_request(namespace, "any", command=["id"]))
    error, _ = await stream_error(unsigned.exec(_messages(start)))
    assert error.code is Code.UNAUTHENTICATED
    signed = runtime(make_client, transport="connect-h2c")
    error, _ = await stream_error(signed.exec(_messages(pb.ExecRequest(stdin=b"x"))))
    assert error.code is Code.INVALID_ARGUMENT
    assert "must carry start" in error.message
    error, _ = await stream_error(signed.port_forward_stream(_messages()))
    assert error.code is Code.INVALID_ARGUMENT
    assert "ended before its first message" in error.message
    error, _ = await stream_error(
        signed.exec(_messages(pb.ExecRequest(start=exec_request(namespace, "no-such-pod"))))
    )
    assert error.code is Code.NOT_FOUND
