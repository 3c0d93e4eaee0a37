"""Client-side request streams for tests of client-streaming and bidirectional RPCs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["Outbox"]


class Outbox:
    """A request stream fed while it is being sent (full duplex): pass it as the RPC's request
    iterator, :meth:`put` messages whenever the test wants, :meth:`end` to half-close."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, message: Any) -> None:
        self.queue.put_nowait(message)

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (message := await self.queue.get()) is not None:
            yield message
