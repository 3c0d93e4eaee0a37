"""ASGI types and the one response rewrite both services need (any server).

Nothing here imports a server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

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
    message, so the server sends it chunked (HTTP/1.1) or with no declared length (HTTP/2). Holding
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
