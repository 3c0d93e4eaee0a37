"""Local input to a session: read from a file descriptor or socket, sent in order with offsets.

One write is in flight at a time; bytes that arrive meanwhile go out together in the next write
(at most 64 KiB each, the agent's limit), so a fast typist costs one round trip per batch, not
per key. Every write carries its offset, so the agent applies them in order whatever the network
does. End of input becomes a close (``close_stdin``) where the session supports one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

__all__ = ["MAX_PENDING", "MAX_WRITE", "OrderedWriter"]

#: The agent's default ``runtime.max_write_bytes``.
MAX_WRITE = 64 * 1024
#: Input held here before the reader of the local side is paused (backpressure to stdin or the
#: local connection): a fast producer never grows the client's memory beyond this.
MAX_PENDING = 1024 * 1024

#: Sends ``data`` at ``offset``; ``close`` ends the input after it.
Send = Callable[[bytes, int, bool], Awaitable[None]]


class OrderedWriter:
    """Feed it with :meth:`feed` and :meth:`close`; :meth:`run` sends until closed."""

    def __init__(self, send: Send, *, can_close: bool = True, max_write: int = MAX_WRITE) -> None:
        self._send = send
        self._can_close = can_close
        self._max_write = max_write
        self._buffer = bytearray()
        self._closed = False
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.offset = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self._ready.set()
        if len(self._buffer) >= MAX_PENDING:
            self._room.clear()

    async def room(self) -> None:
        """Return once less than MAX_PENDING bytes wait to be sent."""
        await self._room.wait()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def run(self) -> None:
        """Send everything fed, in order; returns once closed and sent."""
        close_sent = False
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._buffer:
                chunk = bytes(self._buffer[: self._max_write])
                del self._buffer[: len(chunk)]
                close = self._can_close and self._closed and not self._buffer
                await self._send(chunk, self.offset, close)
                self.offset += len(chunk)
                close_sent = close_sent or close
                if len(self._buffer) < MAX_PENDING:
                    self._room.set()
            if self._closed:
                if self._can_close and not close_sent:
                    await self._send(b"", self.offset, True)
                return
