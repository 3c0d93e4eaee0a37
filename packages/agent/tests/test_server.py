"""The HTTP layer without Kubernetes: socket options, /ping routing, lifespan."""

from __future__ import annotations

import socket
from typing import Any

from otterscale.agent._kube import _socket_factory, impersonation_headers
from otterscale.agent._server import make_asgi_app
from otterscale.common import Identity


def test_kube_sockets_set_nodelay_and_keepalive() -> None:
    info = socket.getaddrinfo("127.0.0.1", 443, type=socket.SOCK_STREAM)[0]
    sock = _socket_factory(info)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    finally:
        sock.close()


def test_impersonation_headers() -> None:
    headers = impersonation_headers(Identity("alice", ("devs", "ops")))
    assert headers == [
        ("Impersonate-User", "alice"),
        ("Impersonate-Group", "devs"),
        ("Impersonate-Group", "ops"),
        ("Impersonate-Group", "system:authenticated"),
    ]


async def _call(app: Any, scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_ping_and_routing() -> None:
    forwarded: list[str] = []

    async def service(scope: dict[str, Any], receive: Any, send: Any) -> None:
        forwarded.append(scope["path"])

    started: list[bool] = []
    app = make_asgi_app(service, on_startup=lambda: started.append(True))
    ping = await _call(app, {"type": "http", "path": "/ping", "method": "GET"}, [])
    assert ping[0]["status"] == 204
    post = await _call(app, {"type": "http", "path": "/ping", "method": "POST"}, [])
    assert post[0]["status"] == 405
    await _call(
        app, {"type": "http", "path": "/otterscale.resource.v1.ResourceService/List", "method": "POST"}, []
    )
    assert forwarded == ["/otterscale.resource.v1.ResourceService/List"]
    lifespan = await _call(
        app, {"type": "lifespan"}, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    )
    assert [m["type"] for m in lifespan] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert started == [True]
