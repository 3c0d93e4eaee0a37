"""The agent's HTTP server: hypercorn (asyncio) serving ResourceService and the probes.

Probes (no signature needed, GET or HEAD): ``/ping`` answers 204 while the process serves
(liveness); ``/readyz`` answers 200 when the agent can be reached by the hub (its tunnel is up)
and 503 with a one-line reason otherwise (readiness).

Why hypercorn: it speaks HTTP/1.1 and h2c (prior knowledge and Upgrade) on one port and carries
HTTP/2 trailers, which the gRPC protocol needs (see architecture.md). Its defaults are tuned here
for a long-lived, multiplexed hub connection:

- ``keep_alive_max_requests`` raised from 1000 (hypercorn would otherwise GOAWAY a busy hub
  connection after 1000 requests);
- ``h2_max_concurrent_streams`` raised to 1000 (every open Watch is a stream);
- ``keep_alive_timeout`` 120 s, longer than typical client pool idle timeouts (90 s), so the
  client, not the server, closes idle connections (no request races a server-side close);
- no read timeout: a Watch is never cut by a server-side timer.

The listening socket is created here, not by hypercorn, so the caller learns the real port of
``:0`` before serving, and TCP_NODELAY is set on it (accepted sockets inherit it; asyncio also
sets it on every TCP transport).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app

logger = logging.getLogger(__name__)

__all__ = ["ASGIApp", "Readiness", "make_asgi_app", "mount", "serve"]

Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

#: How long open requests may take to finish after shutdown starts (Watches end at once).
GRACEFUL_TIMEOUT = 5.0


def mount(default: Any, *others: Any) -> ASGIApp:
    """One ASGI app for several Connect services: each ``others`` app serves the paths under its
    ``.path`` (``/package.Service``); everything else goes to ``default`` (which answers 404s)."""
    routes = [(app.path + "/", app) for app in others]

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        for prefix, target in routes:
            if path.startswith(prefix):
                await target(scope, receive, send)
                return
        await default(scope, receive, send)

    return app


#: Tells whether the agent is ready: None when it is, else a short reason.
Readiness = Callable[[], str | None]


def make_asgi_app(
    service_app: Any,
    *,
    on_startup: Callable[[], None] | None = None,
    readiness: Readiness | None = None,
) -> ASGIApp:
    """Route ``/ping`` to a 204, ``/readyz`` to ``readiness``, everything else to Connect.

    ``on_startup`` is called when the server starts the application (ASGI lifespan startup).
    ``readiness`` None means always ready.
    """

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            # Answer lifespan ourselves: the Connect app needs no startup work.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                    if on_startup is not None:
                        on_startup()
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind == "http" and scope["path"] == "/ping":
            status = 204 if scope["method"] in _PROBE_METHODS else 405
            headers = [] if status == 204 else [(b"allow", b"GET, HEAD")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if kind == "http" and scope["path"] == "/readyz":
            await _readyz(scope, send, readiness)
            return
        await service_app(scope, receive, send)

    return app


_PROBE_METHODS = frozenset({"GET", "HEAD"})


async def _readyz(scope: dict[str, Any], send: Send, readiness: Readiness | None) -> None:
    if scope["method"] not in _PROBE_METHODS:
        status, body = 405, b"method not allowed\n"
        headers = [(b"allow", b"GET, HEAD")]
    else:
        reason = readiness() if readiness is not None else None
        status, body = (200, b"ok\n") if reason is None else (503, _one_line(reason).encode() + b"\n")
        headers = []
    headers += [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _config() -> Config:
    config = Config()
    config.keep_alive_max_requests = 2**31 - 1
    config.keep_alive_timeout = 120.0
    config.h2_max_concurrent_streams = 1000
    config.read_timeout = None
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(app: ASGIApp, sock: socket.socket, shutdown: asyncio.Event) -> None:
    """Serve ``app`` on ``sock`` until ``shutdown`` is set; then stop accepting and drain.

    Returns once open requests have finished or :data:`GRACEFUL_TIMEOUT` has passed. The socket
    is closed when this returns.
    """
    config = _config()
    try:
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),
            config,
            sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
            shutdown_trigger=shutdown.wait,
        )
    finally:
        sock.close()
