"""Open exec and port-forward WebSockets to kube-apiserver, as message streams.

:class:`ExecConnection` speaks the exec channel protocol (``_channel``): stdin, half-close
(v5 only), resize, and the channels the server sends. :class:`PortForwardConnection` speaks the
kubelet's port-forward protocol for one port: data both ways, the kubelet's error text, the
2-byte port announcement each channel starts with. Both count bytes on their session and never
log payloads.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp

from .._errors import PreconditionError, StreamUnavailableError
from ._channel import (
    EXEC_V4,
    EXEC_V5,
    STDIN,
    ProtocolError,
    close_message,
    message,
    port_prefix,
    resize_message,
    split,
)
from ._sessions import Session

logger = logging.getLogger(__name__)

__all__ = ["ExecConnection", "PortForwardConnection", "Resizer"]


async def _frames(ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[tuple[int, bytes]]:
    """``(channel, payload)`` of each binary message until the server closes."""
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY:
            try:
                yield split(msg.data)
            except ProtocolError as exc:
                raise StreamUnavailableError(f"kubernetes API broke the stream protocol: {exc}") from exc
        elif msg.type is aiohttp.WSMsgType.ERROR:
            raise StreamUnavailableError(f"the stream to kubernetes API broke: {ws.exception()}")
        # Text messages belong to the base64 protocols, which are never negotiated here.


class ExecConnection:
    """An exec WebSocket (``v5.channel.k8s.io`` or ``v4.channel.k8s.io``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: Session) -> None:
        self.ws = ws
        self.protocol = ws.protocol or ""
        self._session = session
        if self.protocol not in (EXEC_V5, EXEC_V4):
            raise StreamUnavailableError(
                "kubernetes API offers no exec protocol this agent speaks "
                f"({EXEC_V5} or {EXEC_V4}; Kubernetes 1.30 or newer has both)"
            )

    @property
    def can_close_stdin(self) -> bool:
        """Only v5 can half-close stdin."""
        return self.protocol == EXEC_V5

    @property
    def close_refusal(self) -> str:
        """Why close_stdin cannot work (when it cannot)."""
        return (
            f"this cluster's API server speaks {self.protocol}, which cannot close stdin "
            f"(that needs {EXEC_V5}, Kubernetes 1.30 or newer)"
        )

    async def write_stdin(self, data: bytes, close: bool) -> None:
        if data:
            await self.ws.send_bytes(message(STDIN, data))
            self._session.bytes_in += len(data)
        if close:
            await self.ws.send_bytes(close_message(STDIN))

    async def resize(self, rows: int, cols: int) -> None:
        await self.ws.send_bytes(resize_message(rows, cols))

    def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        return _frames(self.ws)


class PortForwardConnection:
    """A port-forward WebSocket for one port: channel 0 data, channel 1 the kubelet's errors."""

    DATA, ERROR = 0, 1
    CLOSE_REFUSAL = (
        "Kubernetes' WebSocket port-forward protocol cannot half-close a connection; send the data "
        "without close_write (the connection ends when the pod closes it or the session ends)"
    )

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: Session, port: int) -> None:
        self.ws = ws
        self._session = session
        self._port = port

    async def write(self, data: bytes, close: bool) -> None:
        if close:
            raise PreconditionError(self.CLOSE_REFUSAL)
        if data:
            await self.ws.send_bytes(message(self.DATA, data))
            self._session.bytes_in += len(data)

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """Data and error frames, after checking each channel's port announcement."""
        announced: set[int] = set()
        async for channel, payload in _frames(self.ws):
            if channel not in (self.DATA, self.ERROR):
                raise StreamUnavailableError(f"kubernetes API sent port-forward channel {channel}")
            if channel not in announced:
                try:
                    port_prefix(payload, self._port)
                except ProtocolError as exc:
                    raise StreamUnavailableError(
                        f"kubernetes API broke the port-forward protocol: {exc}"
                    ) from exc
                announced.add(channel)
                continue
            yield channel, payload


class Resizer:
    """Applies terminal sizes, latest wins: sizes that arrive while one is being sent collapse."""

    def __init__(self, connection: ExecConnection) -> None:
        self._connection = connection
        self._wanted: tuple[int, int] | None = None
        self._sent: tuple[int, int] | None = None
        self._busy = False

    async def __call__(self, rows: int, cols: int) -> None:
        self._wanted = (rows, cols)
        if self._busy:
            return  # the call in progress sends the latest size before it returns
        self._busy = True
        try:
            while self._wanted is not None and self._wanted != self._sent:
                size = self._wanted
                await self._connection.resize(*size)
                self._sent = size
        finally:
            self._busy = False
