"""Listening sockets the services create themselves (so they own every socket option), and
serving an ASGI application on one with hypercorn.

Why hypercorn: it serves HTTP/1.1, h2c with prior knowledge and h2c upgrade on one port and
carries HTTP/2 trailers, which the gRPC protocol needs (architecture.md). hypercorn is imported
only when serving, so the ``otterscale`` command starts fast.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._h2 import tune_hypercorn

if TYPE_CHECKING:
    from hypercorn.config import Config


def create_listener(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking TCP socket with TCP_NODELAY; host "" means all interfaces.

    TCP_NODELAY on the listener is inherited by every accepted connection: small Connect and gRPC
    frames must not wait for Nagle's algorithm. On an IPv6 wildcard the socket also accepts IPv4.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6 and not host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
#: An ASGI 3 application.
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


async def drain_request(receive: Receive) -> bool:
    """Read a request's body to its end, discarding it; False when the client disconnected first.

    Answer an HTTP/2 request only after this: answering before its body has ended makes
    hypercorn 0.18 fail on the DATA frames that follow and drop the whole connection.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        if message["type"] == "http.request" and not message.get("more_body", False):
            return True


#: Responses that never carry a body, so never a Content-Length of their (empty) body either.
_BODILESS_STATUS = frozenset({204, 304})


def with_content_length(app: ASGIApp) -> ASGIApp:
    """``app``, with a ``Content-Length`` on every response whose whole body comes in one message.

    connectrpc writes a unary answer as a start message without one and a single final body
    message, so hypercorn sends it chunked (HTTP/1.1) or with no declared length (HTTP/2). Holding
    the start message until the next one costs nothing and lets a reader know the size up front:
    the hub checks an agent's answer against ``max_response_bytes`` before reading it and then
    reads it natively, not chunk by chunk through Python (~50 ms less per 5 MB List). Streams
    (the first body message says more follows) and responses with trailers go out unchanged.
    """

    async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "HEAD":
            await app(scope, receive, send)
            return
        held: dict[str, Any] | None = None

        async def send_with_length(message: dict[str, Any]) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and not message.get("trailers"):
                held = message
                return
            if held is not None:
                start, held = held, None
                if (
                    message["type"] == "http.response.body"
                    and not message.get("more_body", False)
                    and start["status"] not in _BODILESS_STATUS
                    and not any(
                        name.lower() in (b"content-length", b"transfer-encoding")
                        for name, _ in start["headers"]
                    )
                ):
                    length = str(len(message.get("body", b""))).encode()
                    start = {**start, "headers": [*start["headers"], (b"content-length", length)]}
                await send(start)
            await send(message)

        await app(scope, receive, send_with_length)
        if held is not None:  # a start without a body (not valid ASGI): pass it on as it came
            await send(held)

    return application


def server_config(*, graceful_timeout: float) -> Config:
    """hypercorn settings for a service whose clients hold long-lived, multiplexed connections.

    - ``keep_alive_max_requests`` raised from 1000 (hypercorn would otherwise GOAWAY a busy
      connection, the hub's to its agent or a client's to the hub, after 1000 requests);
    - ``h2_max_concurrent_streams`` 1000 (every open Watch is a stream);
    - ``keep_alive_timeout`` 120 s, longer than typical client pool idle timeouts (90 s), so the
      client, not the server, closes idle connections (no request races a server-side close);
    - no read timeout: a Watch is never cut by a server-side timer;
    - ``graceful_timeout`` is the drain deadline: after shutdown starts, requests in flight get
      that long to finish.
    """
    from hypercorn.config import Config

    config = Config()
    config.keep_alive_max_requests = 2**31 - 1
    config.keep_alive_timeout = 120.0
    config.h2_max_concurrent_streams = 1000
    config.read_timeout = None
    config.graceful_timeout = graceful_timeout
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(
    app: ASGIApp, sock: socket.socket, shutdown: asyncio.Event, *, graceful_timeout: float
) -> None:
    """Serve ``app`` with hypercorn (HTTP/1.1 and h2c) on ``sock`` until ``shutdown`` is set.

    Then stop accepting and drain: returns once open requests have finished or
    ``graceful_timeout`` has passed, and closes ``sock``. hypercorn is tuned first
    (:func:`tune_hypercorn`: O(1) HTTP/2 scheduling, bounded send buffers); one-message answers
    get a Content-Length (:func:`with_content_length`).
    """
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.config import Sockets
    from hypercorn.utils import wrap_app

    tune_hypercorn()
    config = server_config(graceful_timeout=graceful_timeout)
    try:
        await worker_serve(
            wrap_app(with_content_length(app), config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
            config,
            sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
            shutdown_trigger=shutdown.wait,
        )
    finally:
        sock.close()
