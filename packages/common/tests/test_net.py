"""Serving: a one-message answer carries its Content-Length, over HTTP/1.1 and h2c, through a real
hypercorn (``otterscale.common.serve``); streams, trailers, HEAD and 204 go out as the app sent them.

Tests of ``serve()`` on hypercorn (marker ``hypercorn``): deleted with it when the hub and the
agent leave hypercorn. The behaviour they stand for (a unary answer declares its length) is
tested at the hub's and the agent's ports as well, and stays.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import create_listener, drain_request, serve

pytestmark = pytest.mark.hypercorn

BODY = b"x" * 70_000  # bigger than one HTTP/2 frame and one socket write


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    headers = [(b"content-type", b"application/octet-stream")]
    if path == "/one":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY})
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY[:100], "more_body": True})
        await send({"type": "http.response.body", "body": BODY[100:]})
    elif path == "/declared":
        own = [*headers, (b"Content-Length", str(len(BODY)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": own})
        await send({"type": "http.response.body", "body": BODY})
    elif path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/trailers":
        await send({"type": "http.response.start", "status": 200, "headers": headers, "trailers": True})
        await send({"type": "http.response.body", "body": BODY})
        await send({"type": "http.response.trailers", "headers": [(b"x-end", b"1")]})


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    sock = create_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    server = asyncio.create_task(serve(_app, sock, shutdown, graceful_timeout=2), name="test-net-server")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        shutdown.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(server, 10)


@pytest.fixture(params=[HTTPVersion.HTTP1, HTTPVersion.HTTP2], ids=["http1", "h2c"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    transport = HTTPTransport(http_version=request.param, enable_gzip=False)
    try:
        yield Client(transport)
    finally:
        await transport.aclose()


async def test_a_one_message_answer_declares_its_length(base_url: str, client: Client) -> None:
    response = await client.get(f"{base_url}/one")
    assert response.status == 200
    assert response.headers.get("content-length") == str(len(BODY))
    assert response.headers.get("transfer-encoding") is None
    assert bytes(response.content) == BODY


async def test_a_stream_is_left_as_it_was(base_url: str, client: Client) -> None:
    response = await client.get(f"{base_url}/stream")
    assert response.headers.get("content-length") is None
    assert bytes(response.content) == BODY


async def test_an_apps_own_length_is_kept_not_doubled(base_url: str, client: Client) -> None:
    response = await client.get(f"{base_url}/declared")
    assert response.headers.getall("content-length") == [str(len(BODY))]
    assert bytes(response.content) == BODY


async def test_no_length_on_204_or_head(base_url: str, client: Client) -> None:
    empty = await client.get(f"{base_url}/empty")
    assert empty.status == 204
    assert empty.headers.get("content-length") is None
    head = await client.execute("HEAD", f"{base_url}/one")
    assert head.status == 200
    assert head.headers.get("content-length") is None


async def test_an_answer_with_trailers_is_left_as_it_was(base_url: str) -> None:
    transport = HTTPTransport(http_version=HTTPVersion.HTTP2)
    try:
        # hypercorn sends trailers only to a client that says it takes them (as gRPC clients do).
        response = await Client(transport).get(f"{base_url}/trailers", headers={"te": "trailers"})
        assert response.headers.get("content-length") is None
        assert bytes(response.content) == BODY
        assert response.trailers.get("x-end") == "1"
    finally:
        await transport.aclose()


async def test_drain_request_reads_to_the_end_or_reports_a_disconnect() -> None:
    def feed(*messages: dict[str, Any]) -> Any:
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        receive.left = queue  # type: ignore[attr-defined]
        return receive

    whole = feed(
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": False},
        {"type": "http.disconnect"},
    )
    assert await drain_request(whole) is True
    assert whole.left == [{"type": "http.disconnect"}]  # nothing read past the body's end
    assert (
        await drain_request(
            feed({"type": "http.request", "body": b"a", "more_body": True}, {"type": "http.disconnect"})
        )
        is False
    )
