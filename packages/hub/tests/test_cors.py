"""CORS on the hub: the matching rules (pure), the ASGI layer, followers, and a hub process.

The rules and the layer are unit-tested with a stand-in inner application (the layer's own logic
is all that runs, no server). Then the real thing: two hub processes, one following the other (a
follower answers preflights itself and a forwarded answer carries one set of CORS headers), and
the ``otterscale server`` process with a ``cors`` section, asked over HTTP/1.1 and h2c by a real
HTTP client: preflights, actual calls (authenticated and not) and disallowed origins, methods
and headers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pyqwest import Client, HTTPTransport, HTTPVersion, SyncClient, SyncHTTPTransport

from otterscale.common import ChiselBinary, CorsConfig
from otterscale.hub._cors import (
    ALLOWED_REQUEST_HEADERS,
    EXPOSED_HEADERS,
    CorsLayer,
    CorsPolicy,
    with_cors,
)
from otterscale.testing import ControlPlane, System, start_system

from .conftest import AUDIENCE, Issuer, Replicas, ReplicasEnv

DASHBOARD = "https://dashboard.example.com"
LIST = "/otterscale.resource.v1.ResourceService/List"
LIST_CLUSTERS = "/otterscale.cluster.v1.ClusterService/ListClusters"
EXPOSED = ", ".join(EXPOSED_HEADERS)
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
#: What connect-web sends for a unary call with a bearer token (Chromium lists them sorted, lower case).
CONNECT_HEADERS = "authorization,connect-protocol-version,content-type"


def policy(*origins: str, **options: Any) -> CorsPolicy:
    return CorsPolicy(CorsConfig(allowed_origins=origins, **options))


# --------------------------------------------------------------------------------------------------
# Matching rules


@pytest.mark.parametrize(
    ("allowed", "origin", "expected"),
    [
        ("https://dashboard.example.com", "https://dashboard.example.com", True),
        ("https://dashboard.example.com", "https://DASHBOARD.example.com", True),  # host: any case
        ("https://dashboard.example.com", "https://dashboard.example.com:443", True),  # default port
        ("https://dashboard.example.com", "http://dashboard.example.com", False),  # scheme
        ("https://dashboard.example.com", "https://dashboard.example.com:8443", False),  # port
        ("https://dashboard.example.com", "https://dashboard.example.com.evil.net", False),
        ("https://dashboard.example.com", "https://evil-dashboard.example.com", False),
        ("https://dashboard.example.com", "null", False),
        ("http://127.0.0.1:5173", "http://127.0.0.1:5173", True),
        ("http://127.0.0.1:5173", "http://127.0.0.1:5174", False),
        ("http://127.0.0.1:5173", "http://localhost:5173", False),
        ("http://[::1]:8080", "http://[::1]:8080", True),
        ("https://*.example.com", "https://a.example.com", True),
        ("https://*.example.com", "https://A-1.Example.com", True),
        ("https://*.example.com", "https://a.b.example.com", False),  # one level only
        ("https://*.example.com", "https://example.com", False),
        ("https://*.example.com", "https://.example.com", False),
        ("https://*.example.com", "https://evil.net/.example.com", False),
        ("https://*.example.com", "https://a.example.com.evil.net", False),
        ("https://*.example.com", "https://a.example.com:8443", False),
        ("https://*.example.com", "http://a.example.com", False),
        ("https://*.example.com:8443", "https://a.example.com:8443", True),
        ("https://*.example.com:8443", "https://a.example.com", False),
        ("*", "https://anything.example.org", True),
        ("*", "http://127.0.0.1:1", True),
        ("*", "null", False),  # sandboxed frames and file:// pages stay out even with '*'
        ("*", "chrome-extension://abcdef", False),
        ("*", "https://bücher.example", False),
    ],
)
def test_origin_matching(allowed: str, origin: str, expected: bool) -> None:
    # Build through the configuration model, as the hub does: entries are canonical first.
    assert policy(allowed).allows_origin(origin) is expected


def test_preflight_echoes_the_method_and_the_requested_headers() -> None:
    headers = policy(DASHBOARD).preflight(DASHBOARD, "POST", "Authorization, content-type,X-Request-Id")
    assert headers == [
        (b"access-control-allow-origin", DASHBOARD.encode()),
        (b"access-control-allow-methods", b"POST"),
        (b"access-control-max-age", b"7200"),
        (b"access-control-allow-headers", b"authorization, content-type, x-request-id"),
    ]


def test_every_connect_and_grpc_web_header_is_allowed() -> None:
    every = ",".join(ALLOWED_REQUEST_HEADERS)
    assert "authorization" in ALLOWED_REQUEST_HEADERS  # the original service's bug
    headers = policy(DASHBOARD).preflight(DASHBOARD, "GET", every)
    assert isinstance(headers, list)
    assert dict(headers)[b"access-control-allow-headers"] == ", ".join(ALLOWED_REQUEST_HEADERS).encode()


@pytest.mark.parametrize(
    ("origin", "method", "requested", "reason"),
    [
        ("https://evil.example.com", "POST", "content-type", "origin not allowed"),
        (DASHBOARD, "DELETE", "content-type", "method 'DELETE' not allowed"),
        (DASHBOARD, "PUT", "", "method 'PUT' not allowed"),
        (DASHBOARD, "POST", "content-type, x-tenant", "not allowed: x-tenant"),
        (DASHBOARD, "POST", "cookie", "not allowed: cookie"),
        (DASHBOARD, "POST", ",".join(f"x-h{i}" for i in range(65)), "65 request headers"),
    ],
)
def test_refused_preflights_say_why(origin: str, method: str, requested: str, reason: str) -> None:
    decision = policy(DASHBOARD).preflight(origin, method, requested)
    assert isinstance(decision, str)
    assert reason in decision


def test_extra_allowed_headers_extend_the_list() -> None:
    extended = policy(DASHBOARD, extra_allowed_headers=("X-Tenant",))
    assert isinstance(extended.preflight(DASHBOARD, "POST", "x-tenant,authorization"), list)


def test_credentials_only_when_configured() -> None:
    plain, with_credentials = policy(DASHBOARD), policy(DASHBOARD, allow_credentials=True)
    credentials = (b"access-control-allow-credentials", b"true")
    assert credentials not in plain.response_headers(DASHBOARD)
    assert credentials not in plain.preflight(DASHBOARD, "POST", "")
    assert credentials in with_credentials.response_headers(DASHBOARD)
    assert credentials in with_credentials.preflight(DASHBOARD, "POST", "")


def test_actual_responses_echo_the_origin_and_expose_grpc_headers() -> None:
    assert policy("https://*.example.com").response_headers("https://a.example.com") == [
        (b"access-control-allow-origin", b"https://a.example.com"),
        (b"access-control-expose-headers", EXPOSED.encode()),
    ]
    assert {"Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin", "X-Request-Id"} <= set(EXPOSED_HEADERS)
    assert policy(DASHBOARD).response_headers("https://evil.example.com") == []


# --------------------------------------------------------------------------------------------------
# The ASGI layer


class Inner:
    """A stand-in router: answers 200 with a few headers of its own and records what it saw."""

    def __init__(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.headers = headers or [(b"content-type", b"application/json")]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": b"{}"})


async def call(app: Any, method: str, headers: dict[str, str]) -> tuple[int, list[tuple[bytes, bytes]]]:
    scope = {
        "type": "http",
        "method": method,
        "path": LIST,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    assert start["type"] == "http.response.start"
    return start["status"], list(start["headers"])


def cors_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in headers if k.startswith(b"access-control-")}


def header(headers: list[tuple[bytes, bytes]], name: str) -> list[str]:
    return [v.decode() for k, v in headers if k.decode().lower() == name]


def test_no_origins_means_no_layer_at_all() -> None:
    inner = Inner()
    assert with_cors(inner, CorsConfig()) is inner


async def test_a_preflight_is_answered_without_reaching_the_router(caplog: pytest.LogCaptureFixture) -> None:
    inner = Inner()
    app = with_cors(inner, CorsConfig(allowed_origins=(DASHBOARD,)))
    preflight = {
        "origin": DASHBOARD,
        "access-control-request-method": "POST",
        "access-control-request-headers": CONNECT_HEADERS,
    }
    status, headers = await call(app, "OPTIONS", preflight)
    assert status == 204
    assert inner.calls == []
    assert cors_headers(headers) == {
        "access-control-allow-origin": DASHBOARD,
        "access-control-allow-methods": "POST",
        "access-control-allow-headers": "authorization, connect-protocol-version, content-type",
        "access-control-max-age": "7200",
    }
    assert header(headers, "vary") == [PREFLIGHT_VARY]

    with caplog.at_level(logging.DEBUG, logger="otterscale.hub._cors"):
        status, headers = await call(app, "OPTIONS", {**preflight, "origin": "https://evil.example.com"})
    assert (status, cors_headers(headers), header(headers, "vary")) == (204, {}, [PREFLIGHT_VARY])
    assert inner.calls == []
    assert "'https://evil.example.com' answered without CORS headers: origin not allowed" in caplog.text


async def test_options_without_a_request_method_is_not_a_preflight() -> None:
    inner = Inner()
    app = with_cors(inner, CorsConfig(allowed_origins=(DASHBOARD,)))
    status, _ = await call(app, "OPTIONS", {"origin": DASHBOARD})
    assert status == 200
    assert len(inner.calls) == 1  # the router answers it (405 for a Connect path)


async def test_actual_responses_get_cors_headers_for_allowed_origins_only() -> None:
    app = with_cors(Inner(), CorsConfig(allowed_origins=(DASHBOARD,)))
    _, headers = await call(app, "POST", {"origin": DASHBOARD})
    assert cors_headers(headers) == {
        "access-control-allow-origin": DASHBOARD,
        "access-control-expose-headers": EXPOSED,
    }
    assert header(headers, "vary") == ["Origin"]
    assert header(headers, "content-type") == ["application/json"]
    for other in ({"origin": "https://evil.example.com"}, {}):
        _, headers = await call(app, "POST", other)
        assert cors_headers(headers) == {}
        assert header(headers, "vary") == ["Origin"]  # a cache must not hand one origin's answer to another


async def test_cors_headers_from_inside_are_replaced_not_doubled() -> None:
    inner = Inner(
        [
            (b"content-type", b"application/proto"),
            (b"Access-Control-Allow-Origin", b"*"),
            (b"vary", b"Accept-Encoding"),
        ]
    )
    app = CorsLayer(inner, policy(DASHBOARD))
    _, headers = await call(app, "POST", {"origin": DASHBOARD})
    assert header(headers, "access-control-allow-origin") == [DASHBOARD]
    assert header(headers, "vary") == ["Accept-Encoding, Origin"]


async def test_two_origin_headers_get_no_cors_headers() -> None:
    app = CorsLayer(Inner(), policy(DASHBOARD))
    scope = {
        "type": "http",
        "method": "OPTIONS",
        "path": LIST,
        "headers": [
            (b"origin", DASHBOARD.encode()),
            (b"origin", DASHBOARD.encode()),
            (b"access-control-request-method", b"POST"),
        ],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 204
    assert cors_headers(sent[0]["headers"]) == {}


# --------------------------------------------------------------------------------------------------
# Followers answer preflights themselves (a leader and a follower process, real HTTP)


@pytest_asyncio.fixture
async def leader_and_follower(
    control_plane: ControlPlane, issuer: Issuer, chisel_binary: ChiselBinary, tmp_path: Path
) -> AsyncIterator[Replicas]:
    """``a`` leads, ``b`` follows it; both with a ``cors`` section."""
    replicas = Replicas(
        control_plane, issuer, chisel_binary, tmp_path, extra={"cors": {"allowed_origins": [DASHBOARD]}}
    )
    try:
        replicas.start_leader()
        replicas.follow("a")
        replicas.add_follower("b")
        yield replicas
    finally:
        await replicas.stop()


@pytest.mark.integration
@pytest.mark.ha
async def test_a_follower_answers_preflights_and_forwarded_answers_carry_one_origin(
    leader_and_follower: Replicas, issuer: Issuer
) -> None:
    follower = leader_and_follower.hubs["b"]
    assert (await follower.ametrics()).value("otterscale_hub_leader") == 0
    transport = HTTPTransport(http_version=HTTPVersion.HTTP1)
    try:
        http = Client(transport)
        preflight = await http.options(
            follower.url + LIST_CLUSTERS,
            {"origin": DASHBOARD, "access-control-request-method": "POST"},
        )
        assert preflight.status == 204
        assert preflight.headers.get("access-control-allow-origin") == DASHBOARD

        async def forwarded() -> float:
            return (await follower.ametrics()).get(
                "otterscale_hub_forwarded_rpcs_total",
                service="otterscale.cluster.v1.ClusterService",
                method="ListClusters",
                code="ok",
            )

        env = ReplicasEnv(leader_and_follower)
        try:
            await env.forwarding("b")  # b has seen its Lease name a
        finally:
            await env.close()
        before = await forwarded()
        answer = await http.post(
            follower.url + LIST_CLUSTERS,
            {
                "origin": DASHBOARD,
                "content-type": "application/json",
                "authorization": f"Bearer {issuer.token()}",
            },
            b"{}",
        )
        assert answer.status == 200, answer.content
        assert "clusters" in json.loads(answer.content)  # the leader answered, through the follower
        assert list(answer.headers.getall("access-control-allow-origin")) == [DASHBOARD]
        assert answer.headers.get("access-control-expose-headers") == EXPOSED
        assert await forwarded() - before == 1
    finally:
        await transport.aclose()


# --------------------------------------------------------------------------------------------------
# The hub as a process (`otterscale server`), HTTP/1.1 and h2c


@pytest.fixture(scope="module")
def module_issuer() -> Iterator[Issuer]:
    found = Issuer().start()
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="module")
def hub_process(tmp_path_factory: pytest.TempPathFactory, module_issuer: Issuer) -> Iterator[System]:
    """``otterscale server`` with a ``cors`` section and one configured cluster (no agent needed)."""
    cors = {"allowed_origins": [DASHBOARD, "http://*.dev.example.com:5173"]}
    system = start_system(
        tmp_path_factory.mktemp("cors-hub"),
        {"alpha": None},
        realm_url=module_issuer.url,
        client_id=AUDIENCE,
        extra_config={"cors": cors},
    )
    try:
        yield system
    finally:
        system.stop()


VERSIONS = {"http1": HTTPVersion.HTTP1, "h2c": HTTPVersion.HTTP2}


@pytest.fixture(params=sorted(VERSIONS))
def http(request: pytest.FixtureRequest) -> Iterator[SyncClient]:
    transport = SyncHTTPTransport(http_version=VERSIONS[request.param], timeout=30.0)
    try:
        yield SyncClient(transport)
    finally:
        transport.close()


@pytest.mark.integration
def test_hub_process_answers_preflights_before_authentication(hub_process: System, http: SyncClient) -> None:
    for origin in (DASHBOARD, "http://team-a.dev.example.com:5173"):
        answer = http.options(
            hub_process.hub_url + LIST,
            {
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": CONNECT_HEADERS + ",x-grpc-web,x-user-agent",
            },
        )
        assert answer.status == 204  # no token, and still not 401
        assert answer.headers.get("access-control-allow-origin") == origin
        assert answer.headers.get("access-control-allow-methods") == "POST"
        assert answer.headers.get("access-control-allow-headers") == (
            "authorization, connect-protocol-version, content-type, x-grpc-web, x-user-agent"
        )
        assert answer.headers.get("access-control-max-age") == "7200"
        assert answer.headers.get("vary") == PREFLIGHT_VARY
        assert "access-control-allow-credentials" not in answer.headers
        assert answer.content == b""


@pytest.mark.integration
def test_hub_process_actual_answers_carry_cors_headers(
    hub_process: System, http: SyncClient, module_issuer: Issuer
) -> None:
    json_call = {"origin": DASHBOARD, "content-type": "application/json", "connect-protocol-version": "1"}
    # Unauthenticated: the page must see `unauthenticated` (log in again), not a network error.
    answer = http.post(hub_process.hub_url + LIST_CLUSTERS, json_call, b"{}")
    assert answer.status == 401
    assert json.loads(answer.content)["code"] == "unauthenticated"
    assert answer.headers.get("access-control-allow-origin") == DASHBOARD
    assert answer.headers.get("access-control-expose-headers") == EXPOSED
    assert answer.headers.get("vary") == "Origin"
    # Authenticated.
    token = module_issuer.token()
    answer = http.post(
        hub_process.hub_url + LIST_CLUSTERS, {**json_call, "authorization": f"Bearer {token}"}, b"{}"
    )
    assert answer.status == 200, answer.content
    assert [c["name"] for c in json.loads(answer.content)["clusters"]] == ["alpha"]
    assert answer.headers.get("access-control-allow-origin") == DASHBOARD
    # gRPC-Web puts an error's status in headers: they must be readable by the page.
    answer = http.post(
        hub_process.hub_url + LIST_CLUSTERS,
        {"origin": DASHBOARD, "content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
        b"\x00\x00\x00\x00\x00",
    )
    # The hub sends the status in the trailer frame at the end of the body (a page reads it
    # there); a trailers-only answer would carry it in headers, which are exposed too.
    assert answer.status == 200
    assert re.search(rb"grpc-status: ?16\r\n", answer.content), answer.content
    assert answer.headers.get("access-control-allow-origin") == DASHBOARD
    assert "Grpc-Status" in (answer.headers.get("access-control-expose-headers") or "")


@pytest.mark.integration
def test_hub_process_gives_disallowed_requests_no_cors_headers(hub_process: System, http: SyncClient) -> None:
    url = hub_process.hub_url + LIST
    refused = [
        {"origin": "https://evil.example.com", "access-control-request-method": "POST"},
        {"origin": "http://a.b.dev.example.com:5173", "access-control-request-method": "POST"},
        {"origin": DASHBOARD, "access-control-request-method": "DELETE"},
        {
            "origin": DASHBOARD,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,x-not-allowed",
        },
    ]
    for headers in refused:
        answer = http.options(url, headers)
        assert answer.status == 204, headers
        assert not [name for name in answer.headers if name.startswith("access-control-")], headers
        assert answer.headers.get("vary") == PREFLIGHT_VARY
    # An actual call from a disallowed origin is still answered (CORS is not access control), but
    # without CORS headers the browser keeps the answer from the page.
    answer = http.post(url, {"origin": "https://evil.example.com", "content-type": "application/json"}, b"{}")
    assert answer.status == 401
    assert "access-control-allow-origin" not in answer.headers
    # Each refusal is a debug line in the hub's log, naming the origin and the reason.
    log = hub_process.hub_log.read_text()
    assert (
        "preflight from 'https://evil.example.com' answered without CORS headers: origin not allowed" in log
    )
    assert "request header(s) not allowed: x-not-allowed" in log
    assert "method 'DELETE' not allowed" in log
