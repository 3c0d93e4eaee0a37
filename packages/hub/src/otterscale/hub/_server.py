"""The hub's HTTP front: its ASGI applications, by path.

The API's router: every Connect service under ``/<package>.<Service>/`` (ResourceService,
ClusterService, gRPC health without the per-cluster entries, gRPC reflection v1 and v1alpha),
``GET /healthz`` and ``/livez`` (the process is up) and ``GET /readyz`` (the hub serves: started,
not draining, and its tunnel server up unless it is a follower, which has none). The management
router: ``GET /metrics`` (Prometheus), the full gRPC health (per cluster too), ``/healthz``,
``/livez`` and ``/readyz``. Anything else is 404. With leader election the API services are a
:class:`Switch` between serving and forwarding to the leader.

Served by Envoy (:func:`otterscale.common.serve`): the API on ``--address``, the management
router on ``--management-address``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from otterscale.common import ASGIApp

logger = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Switch:
    """An ASGI app that hands each request to ``primary`` while ``use_primary()``, else ``secondary``.

    With leader election, ResourceService and ClusterService are switched per request: the
    leader serves them itself, a follower forwards them (decided when the request arrives).
    """

    def __init__(self, primary: ASGIApp, secondary: ASGIApp, use_primary: Callable[[], bool]) -> None:
        self._primary = primary
        self._secondary = secondary
        self._use_primary = use_primary

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        app = self._primary if self._use_primary() else self._secondary
        await app(scope, receive, send)


class Router:
    """The hub's ASGI application: dispatch by path (see the module docstring)."""

    def __init__(
        self,
        services: Mapping[str, ASGIApp],
        *,
        metrics: Callable[[], tuple[bytes, str]] | None,
        ready: Callable[[], bool],
        on_startup: Callable[[], None] | None = None,
        read_body: bool = True,
    ) -> None:
        self._services = dict(services)
        self._metrics = metrics
        self._ready = ready
        self._on_startup = on_startup
        # Whether to read a request's body before answering it (Envoy drops the rest itself).
        self._read_body = read_body

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        path: str = scope["path"]
        service = path[1:].partition("/")[0]
        app = self._services.get(service)
        if app is not None:
            await app(scope, receive, send)
            return
        method = scope["method"]
        pending = receive if self._read_body else None
        if path == "/metrics" and self._metrics is not None:
            if method not in ("GET", "HEAD"):
                await _respond(pending, send, 405, b"", headers=[(b"allow", b"GET, HEAD")])
                return
            body, content_type = self._metrics()
            await _respond(pending, send, 200, body if method == "GET" else b"", content_type=content_type)
        elif path in ("/healthz", "/livez"):
            await _respond(pending, send, 200, b"ok\n")
        elif path == "/readyz":
            ready = self._ready()
            await _respond(
                receive if self._read_body else None,
                send,
                200 if ready else 503,
                b"ready\n" if ready else b"not ready\n",
            )
        else:
            await _respond(pending, send, 404, b"not found\n")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                if self._on_startup is not None:
                    self._on_startup()
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(
    receive: Receive | None,
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    # With ``receive``, read the whole request first (Envoy drops the rest of a body itself).
    while receive is not None:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if message["type"] == "http.request" and not message.get("more_body", False):
            break
    response_headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send(
        {"type": "http.response.start", "status": status, "headers": response_headers + (headers or [])}
    )
    await send({"type": "http.response.body", "body": body})
