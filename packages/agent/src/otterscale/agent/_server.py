"""The agent's HTTP application: the Connect services and the probes, served inside Envoy.

Probes (no signature needed, GET or HEAD): ``/ping`` answers 204 while the process serves
(liveness); ``/readyz`` answers 200 when the agent can be reached by the hub (its tunnel is up)
and 503 with a one-line reason otherwise (readiness). ``/metrics`` (GET, no signature) is the
Prometheus exposition of the agent's metrics: counts and durations only, no names of users,
pods or sessions.

Served by :func:`otterscale.common.serve`: Envoy (pyvoy) terminates HTTP/1.1 and h2c on one
port and hosts this ASGI application in its process (``otterscale.common._launch``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from otterscale.common import ASGIApp

from ._metrics import CONTENT_TYPE, AgentMetrics

logger = logging.getLogger(__name__)

__all__ = ["Readiness", "make_asgi_app", "mount"]

Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


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
    metrics: AgentMetrics | None = None,
) -> ASGIApp:
    """Route ``/ping`` to a 204, ``/readyz`` to ``readiness``, ``/metrics`` to ``metrics``,
    everything else to Connect.

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
        if kind == "http" and scope["path"] == "/metrics" and metrics is not None:
            await _metrics(scope, send, metrics)
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


async def _metrics(scope: dict[str, Any], send: Send, metrics: AgentMetrics) -> None:
    if scope["method"] not in _PROBE_METHODS:
        status, body, headers = 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")]
    else:
        status, body, headers = 200, metrics.render(), [(b"content-type", CONTENT_TYPE.encode())]
    headers += [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
