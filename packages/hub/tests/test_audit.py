"""The hub's audit trail: one event per audited RPC, however the call ends, keyed on the RPC.

A hub process (``otterscale server``, real chisel) with the fake agent of conftest.py, writing
its audit trail to a file. The end-to-end test against a real kube-apiserver is
tests/e2e/test_audit.py; here every way a call can end, both codecs, streams, and the read level;
and that a service the hub has no code for is audited in every call shape from its descriptor
alone, whether the agents serve it (the test-only EchoService behind real chisel tunnels, through
a hub alone and through a follower) or the hub itself does (the shape of a hub-served fan-out
service).
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format  # type: ignore[import-untyped]  # no stubs for protobuf 7

from otterscale.cluster.v1 import cluster_pb2
from otterscale.common import AuditTarget, ChiselBinary
from otterscale.hub._audit import AuditedMethod, audited_methods
from otterscale.hub._codec import CODEC_JSON, CODEC_PROTO, RawMessage
from otterscale.hub._routes import cluster_routes, hub_routes
from otterscale.hub._services import HUB_SERVICES, READ_METHODS, ROUTED_SERVICES
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ECHO_HUB_SERVICE, ECHO_SERVICE, ControlPlane
from otterscale.testing.echo.v1 import echo_pb2 as echo

from .conftest import HubEnv, HubFactory, Issuer, start_world
from .test_routing import (
    FORWARDING_PROBE,
    EchoSystem,
    iter_of,
    replicas_system,
    start,
    start_echo_hub,
    start_echo_replicas,
    stop_echo_hub,
    texts,
)

pytestmark = [pytest.mark.integration, pytest.mark.security]

RESOURCE = "otterscale.resource.v1.ResourceService"
MANIFEST = b'{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "CANARY-42"}}'


@pytest_asyncio.fixture(params=["off", "metadata"])
async def audited(
    request: pytest.FixtureRequest, tmp_path: Path, hub_env_factory: HubFactory
) -> tuple[HubEnv, Path, str]:
    """A hub writing its audit trail to a file, reads audited or not (the parameter)."""
    log = tmp_path / "audit.log"
    env = await hub_env_factory(audit={"sink": "file", "file": str(log), "reads": request.param})
    return env, log, request.param


def events(log: Path, request_id: str) -> list[dict[str, Any]]:
    """The events of one call: written before the hub answers, so complete once it has."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in (json.loads(line) for line in lines) if e["request_id"] == request_id]


async def outcome(call: Awaitable[object]) -> Code | None:
    try:
        await call
    except ConnectError as exc:
        return exc.code
    return None


def rid() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


ECHO = "otterscale.testing.echo.v1.EchoService"
ECHO_METHODS = ("Say", "Count", "Collect", "Chat", "Write")


def registry(*routed: Any) -> dict[str, AuditedMethod]:
    """What a hub audits with the registered services (and ``routed`` ones besides)."""
    services = [(service, cluster_routes(service)) for service in (*ROUTED_SERVICES, *routed)]
    services += [(service.descriptor, hub_routes(service.descriptor)) for service in HUB_SERVICES]
    return audited_methods(services, reads=READ_METHODS)


def test_the_audited_set_comes_from_the_registered_services_descriptors() -> None:
    kinds = {procedure: method.kind for procedure, method in registry(ECHO_SERVICE).items()}
    for method in ("Create", "Apply", "Delete"):
        assert kinds.pop(f"/{RESOURCE}/{method}") == "write"
    for method in ("Discovery", "Schema", "List", "Get", "Describe", "Watch"):
        assert kinds.pop(f"/{RESOURCE}/{method}") == "read"
    # Not declared: its .proto says NO_SIDE_EFFECTS.
    assert "/otterscale.cluster.v1.ClusterService/ListClusters" not in READ_METHODS
    assert kinds.pop("/otterscale.cluster.v1.ClusterService/ListClusters") == "read"
    # Reads, yet audited always (not declared reads): one call reaches up to
    # fanout.max_clusters_per_call clusters, and its event is the one record that joins them.
    for method in ("MultiList", "MultiWatch"):
        assert kinds.pop(f"/otterscale.resource.v1.MultiClusterService/{method}") == "write"
    # RuntimeService: the session starts and the changes always; its reads and its session
    # traffic (audited with the session) only at audit.reads: metadata.
    runtime = "otterscale.runtime.v1.RuntimeService"
    for method in ("ExecuteTTY", "Exec", "PortForward", "PortForwardStream", "Scale", "Restart"):
        assert kinds.pop(f"/{runtime}/{method}") == "write"
    for method in ("PodLog", "GetScale", "WriteTTY", "ResizeTTY", "WritePortForward"):
        assert kinds.pop(f"/{runtime}/{method}") == "read"
    # A service the hub has no code for: every method is audited always until it is declared a
    # read. Health and reflection are no registered service, so nothing else is audited.
    assert kinds == {f"/{ECHO}/{method}": "write" for method in ECHO_METHODS}


def test_what_a_request_names_is_read_from_its_descriptor() -> None:
    methods = registry(ECHO_SERVICE)
    apply = pb.ApplyRequest(
        cluster="east", group="apps", version="v1", resource="deployments", namespace="ns", name="web",
        manifest=MANIFEST, dry_run=True,
    )  # fmt: skip
    named = AuditTarget("east", "apps", "v1", "deployments", "ns", "web", True)
    for request in (
        RawMessage(apply.SerializeToString(), CODEC_PROTO),
        RawMessage(json_format.MessageToJson(apply).encode(), CODEC_JSON),
        apply,  # a hub-served application's request is a message already
    ):
        assert methods[f"/{RESOURCE}/Apply"].target(request) == named
    # A request stream is routed by its first message's start.cluster: the target is read there.
    chat = echo.ChatRequest(start=echo.Start(cluster="beta"))
    assert methods[f"/{ECHO}/Chat"].target(RawMessage(chat.SerializeToString(), CODEC_PROTO)) == (
        AuditTarget(cluster="beta")
    )
    # Fields a request type lacks stay empty; an undecodable request names nothing.
    assert methods[f"/{ECHO}/Write"].target(echo.WriteRequest(session_id="alpha.x")) == AuditTarget()
    assert methods[f"/{RESOURCE}/Create"].target(RawMessage(b"\x0a\xff\xff", CODEC_PROTO)) == AuditTarget()
    # The object a Create returned names it (its answer carries the object); a Delete's does not.
    created = pb.Resource()
    created.object.update({"metadata": {"name": "made", "namespace": "ns"}})
    create = methods[f"/{RESOURCE}/Create"]
    assert create.returned(RawMessage(created.SerializeToString(), CODEC_PROTO)) == ("made", "ns")
    assert create.returned(RawMessage(json_format.MessageToJson(created).encode(), CODEC_JSON)) == (
        "made",
        "ns",
    )
    assert methods[f"/{RESOURCE}/Delete"].returns is None


async def test_writes_are_audited_once_whatever_the_outcome(audited: tuple[HubEnv, Path, str]) -> None:
    env, log, _ = audited
    await env.agent("alpha")  # beta stays unconnected
    calls: dict[str, tuple[Any, dict[str, str], Code | None]] = {}
    create = pb.CreateRequest(
        cluster="alpha", version="v1", resource="configmaps", namespace="ns", manifest=MANIFEST
    )
    apply = pb.ApplyRequest(
        cluster="alpha", group="apps", version="v1", resource="deployments", namespace="ns", name="web",
        manifest=MANIFEST, dry_run=True,
    )  # fmt: skip
    delete = pb.DeleteRequest(
        cluster="north", version="v1", resource="configmaps", namespace="ns", name="gone"
    )
    offline = pb.DeleteRequest(cluster="beta", version="v1", resource="configmaps", namespace="ns", name="x")
    token = env.issuer.token("alice", ("developers", "oidc:ops"))
    auth = {"authorization": f"Bearer {token}"}
    cases = [
        ("create-json", env.client(json=True).create, create, auth, None),
        ("apply-proto-dry-run", env.client("grpc-h2c").apply, apply, auth, None),
        ("delete-unknown-cluster", env.client().delete, delete, auth, Code.NOT_FOUND),
        ("delete-offline-cluster", env.client().delete, offline, auth, Code.UNAVAILABLE),
        ("create-no-token", env.client().create, create, {}, Code.UNAUTHENTICATED),
        ("create-expired", env.client().create, create,
         {"authorization": f"Bearer {env.issuer.token(expires_in=-600)}"}, Code.UNAUTHENTICATED),
    ]  # fmt: skip
    for name, call, request, headers, code in cases:
        request_id = rid()
        calls[name] = (request, headers, code)
        assert await outcome(call(request, headers={**headers, "x-request-id": request_id})) is code, name
        [event] = events(log, request_id)
        assert event["code"] == (code.value if code else "ok"), (name, event)
        assert event["verb"] == type(request).__name__.removesuffix("Request"), name
        assert event["service"] == RESOURCE
        if code is not Code.UNAUTHENTICATED:
            assert event["cluster"] == request.cluster, name
            assert event["resource"] == request.resource
            assert event["namespace"] == "ns"
        else:
            # Refused from its headers: an unauthenticated request's body is never read (issue
            # 13), so its event names no target.
            assert (event["cluster"], event["resource"], event["namespace"]) == ("", "", ""), name
        assert event["replica"] == socket.gethostname()
        assert event["source"].startswith("127.0.0.1:")
        assert event["forwarded_by"] == ""
        if headers is auth:
            assert (event["subject"], event["groups"]) == ("alice", ["developers", "oidc:ops"])
        else:
            assert (event["subject"], event["groups"]) == ("", [])
        if name == "create-json":
            assert event["name"] == "created"  # what the agent created (the manifest is not parsed)
        if name == "apply-proto-dry-run":
            assert (event["group"], event["name"], event["dry_run"]) == ("apps", "web", True)
    trail = log.read_text()
    assert "CANARY-42" not in trail
    assert token not in trail
    assert token.rsplit(".", 1)[1] not in trail


async def test_reads_are_audited_only_at_the_metadata_level(audited: tuple[HubEnv, Path, str]) -> None:
    env, log, reads = audited
    await env.agent("alpha")
    auth = env.auth()
    ids = {name: rid() for name in ("get", "list", "watch", "clusters")}
    get = pb.GetRequest(cluster="alpha", version="v1", resource="configmaps", namespace="default", name="cm")
    await env.client().get(get, headers={**auth, "x-request-id": ids["get"]})
    listing = pb.ListRequest(cluster="alpha", version="v1", resource="configmaps", limit=2)
    await env.client(json=True).list(listing, headers={**auth, "x-request-id": ids["list"]})
    watch = pb.WatchRequest(
        cluster="alpha", version="v1", resource="configmaps", namespace="default", resource_version="2",
        field_selector="ok",
    )  # fmt: skip
    seen = [
        e async for e in env.client("grpc-h2c").watch(watch, headers={**auth, "x-request-id": ids["watch"]})
    ]
    assert len(seen) == 2
    await env.cluster_client().list_clusters(
        cluster_pb2.ListClustersRequest(), headers={**auth, "x-request-id": ids["clusters"]}
    )
    found = {name: events(log, request_id) for name, request_id in ids.items()}
    if reads == "off":
        assert found == {name: [] for name in ids}
        return
    assert {name: len(found_events) for name, found_events in found.items()} == dict.fromkeys(ids, 1)
    assert found["get"][0]["name"] == "cm"
    assert (found["list"][0]["verb"], found["list"][0]["namespace"]) == ("List", "")
    assert (found["watch"][0]["verb"], found["watch"][0]["code"]) == ("Watch", "ok")
    clusters = found["clusters"][0]
    assert (clusters["service"], clusters["verb"], clusters["cluster"]) == (
        "otterscale.cluster.v1.ClusterService",
        "ListClusters",
        "",
    )
    assert all(e[0]["subject"] == "alice" for e in found.values())


async def test_a_request_the_hub_cannot_read_is_still_audited(audited: tuple[HubEnv, Path, str]) -> None:
    env, log, _ = audited
    request_id = rid()
    response = await env.http().post(
        env.hub.url + f"/{RESOURCE}/Create",
        headers=env.auth(**{"content-type": "application/proto", "x-request-id": request_id}),
        content=b"\x0a\xff\xff\xff",  # field 1 claims more bytes than there are
    )
    assert response.status == 400
    [event] = events(log, request_id)
    assert (event["verb"], event["code"], event["cluster"], event["subject"]) == (
        "Create",
        "invalid_argument",
        "",
        "alice",
    )


# --------------------------------------------------------------------------------------------------
# Services the hub has no code for


def audit_section(log: Path) -> dict[str, Any]:
    """Reads not audited (the default): every event below is one of a write."""
    return {"sink": "file", "file": str(log)}


@pytest.mark.parametrize("through", ["alone", "follower"])
async def test_a_routed_service_is_audited_in_every_call_shape(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary, through: str, request: pytest.FixtureRequest
) -> None:
    """EchoService, which the hub knows only by its descriptor, served by echo agents behind real
    chisel tunnels: each call gives exactly one event, with the cluster it named (a request
    stream's in its first message, a session's from its id). Through a follower the leader writes
    it, naming the follower; the follower writes none (both write to the same file)."""
    log = tmp_path / "audit.log"
    replicas = through == "follower"
    if replicas:
        control_plane: ControlPlane = request.getfixturevalue("control_plane")
        cluster = start_echo_replicas(
            control_plane, issuer, chisel_binary, tmp_path, audit=audit_section(log)
        )
        system = await replicas_system(cluster)
    else:
        world, agents = start_echo_hub(tmp_path, issuer, chisel_binary, audit=audit_section(log))
        system = EchoSystem(issuer, world.specs, {"a": world.hub}, agents)

    async def stop() -> None:
        await system.close()
        if replicas:
            await cluster.stop()
        else:
            await asyncio.to_thread(stop_echo_hub, world, agents)

    ids = {
        name: rid() for name in ("say", "count", "collect", "chat", "write", "denied", "unknown", "anonymous")
    }

    def headers(name: str, *, token: bool = True) -> dict[str, str]:
        return {**(system.auth() if token else {}), "x-request-id": ids[name]}

    try:
        client = system.client("b" if replicas else "a")
        said = await client.say(echo.SayRequest(cluster="beta", text="hi"), headers=headers("say"))
        counted = client.count(echo.CountRequest(cluster="alpha", count=2), headers=headers("count"))
        assert [m.index async for m in counted] == [0, 1]
        await client.collect(texts("x", "y", cluster="beta"), headers=headers("collect"))
        chat = client.chat(iter_of(start("alpha"), echo.ChatRequest(text="x")), headers=headers("chat"))
        assert [m.text async for m in chat] == ["started", "x"]
        await client.write(echo.WriteRequest(session_id=said.session_id, text="w"), headers=headers("write"))
        refused = {
            "denied": client.say(
                echo.SayRequest(cluster="alpha", text="fail:permission_denied"), headers=headers("denied")
            ),
            "unknown": _drain(client.chat(iter_of(start("gamma")), headers=headers("unknown"))),
            "anonymous": _drain(
                client.count(echo.CountRequest(cluster="alpha"), headers=headers("anonymous", token=False))
            ),
        }
        codes = {name: await outcome(call) for name, call in refused.items()}
        assert codes == {
            "denied": Code.PERMISSION_DENIED,
            "unknown": Code.NOT_FOUND,
            "anonymous": Code.UNAUTHENTICATED,
        }
    finally:
        await stop()
    expected = {
        "say": ("Say", "beta", "ok", "alice"),
        "count": ("Count", "alpha", "ok", "alice"),
        "collect": ("Collect", "beta", "ok", "alice"),  # the first message's start.cluster
        "chat": ("Chat", "alpha", "ok", "alice"),
        "write": ("Write", "beta", "ok", "alice"),  # the session id's cluster
        "denied": ("Say", "alpha", "permission_denied", "alice"),
        "unknown": ("Chat", "gamma", "not_found", "alice"),  # named, though never routed
        # Refused from its headers: an unauthenticated request's body (its cluster) is never read.
        "anonymous": ("Count", "", "unauthenticated", ""),
    }
    trail = [json.loads(line) for line in log.read_text().splitlines()]
    trail = [event for event in trail if event["request_id"] != FORWARDING_PROBE]
    assert sorted(event["request_id"] for event in trail) == sorted(ids.values())  # one each, no more
    for name, event in echo_events(log, ids, expected).items():
        if replicas and name == "anonymous":
            # The follower refuses it from its headers and audits that itself: nothing forwarded.
            assert (event["replica"], event["forwarded_by"]) == ("b", "")
        else:
            assert event["replica"] == ("a" if replicas else socket.gethostname())
            assert event["forwarded_by"] == ("b" if replicas else "")
        assert event["source"].startswith("127.0.0.1:")


async def test_a_hub_served_service_is_audited_in_every_call_shape(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary
) -> None:
    """A service the hub answers itself gets the audit trail through the interceptors the registry
    hands its application (``ServiceContext.interceptors``), with no audit code of its own."""
    log = tmp_path / "audit.log"
    world = start_world(
        tmp_path, issuer, chisel_binary, audit=audit_section(log), hub_services=(ECHO_HUB_SERVICE,)
    )
    system = EchoSystem(issuer, world.specs, {"a": world.hub}, {})
    ids = {name: rid() for name in ("say", "count", "collect", "chat", "write", "denied", "anonymous")}

    def headers(name: str, *, token: bool = True) -> dict[str, str]:
        return {**(system.auth() if token else {}), "x-request-id": ids[name]}

    try:
        client = system.client()
        said = await client.say(echo.SayRequest(cluster="anywhere", text="hi"), headers=headers("say"))
        assert (said.text, said.origin.subject) == ("hi", "alice")
        counted = client.count(echo.CountRequest(count=2), headers=headers("count"))
        assert [m.index async for m in counted] == [0, 1]
        collected = await client.collect(texts("x", "y"), headers=headers("collect"))
        assert list(collected.texts) == ["x", "y"]
        chat = client.chat(iter_of(start(), echo.ChatRequest(text="x")), headers=headers("chat"))
        assert [m.text async for m in chat] == ["started", "x"]
        await client.write(echo.WriteRequest(session_id="s", text="w"), headers=headers("write"))
        denied = client.say(echo.SayRequest(text="fail:permission_denied"), headers=headers("denied"))
        assert await outcome(denied) is Code.PERMISSION_DENIED
        anonymous = client.write(echo.WriteRequest(), headers=headers("anonymous", token=False))
        assert await outcome(anonymous) is Code.UNAUTHENTICATED
    finally:
        await system.close()
        await asyncio.to_thread(world.stop)
    expected = {
        "say": ("Say", "anywhere", "ok", "alice"),  # what the request names, as for any service
        "count": ("Count", "", "ok", "alice"),
        "collect": ("Collect", "", "ok", "alice"),
        "chat": ("Chat", "", "ok", "alice"),
        "write": ("Write", "", "ok", "alice"),
        "denied": ("Say", "", "permission_denied", "alice"),
        "anonymous": ("Write", "", "unauthenticated", ""),
    }
    echo_events(log, ids, expected)


def echo_events(
    log: Path, ids: dict[str, str], expected: dict[str, tuple[str, str, str, str]]
) -> dict[str, dict[str, Any]]:
    """The one event of each call (by name), checked against its expected verb, cluster, code
    and subject."""
    found = {}
    for name, (verb, cluster, code, subject) in expected.items():
        [event] = events(log, ids[name])
        got = (event["service"], event["verb"], event["cluster"], event["code"], event["subject"])
        assert got == (ECHO, verb, cluster, code, subject), name
        found[name] = event
    return found


async def _drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass
