"""A bounded hand-over from reader tasks to a stream handler that also waits on timers.

A streaming handler (PodLog, ExecuteTTY, PortForward) must send a heartbeat after a quiet
period, flush a partial log line after 100 ms and end a session at its idle timeout, while it
waits for the next chunk from Kubernetes. Cancelling a pending WebSocket or body read to look at
the clock is not safe in aiohttp (a cancelled ``receive()`` marks the WebSocket as abnormally
closed), so named tasks read and hand items over through a small buffer; the handler waits on
it with a timeout.

The buffer is bounded (8 items, as the original's output channel): a client that reads slowly
stops the readers, and TCP flow control stops Kubernetes, so memory is bounded by the buffer,
never by the producer. :meth:`Pump.stop` ends the hand-over from outside (agent shutdown, a
session ended by the sweep): the handler's next :meth:`Pump.get` raises the given error, so the
handler itself ends the stream with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Generic, TypeVar

from .._tasks import start_task, stop_tasks

logger = logging.getLogger(__name__)

__all__ = ["END", "TIMEOUT", "Pump"]

K = TypeVar("K")

#: What :meth:`Pump.get` returns once every source is exhausted.
END: Any = object()
#: What :meth:`Pump.get` returns when its timeout passed with nothing to hand over.
TIMEOUT: Any = object()


class Pump(Generic[K]):
    """Reads each source of ``sources`` in its own task (``name``/key) into one bounded buffer.

    :meth:`get` returns ``(key, item)``, :data:`END` after the last item of the last source,
    :data:`TIMEOUT` on timeout, and raises a source's exception (after the items read before it)
    or the error given to :meth:`stop`. Always :meth:`close` it (cancels the readers).
    """

    def __init__(self, sources: Mapping[K, AsyncIterator[Any]], *, name: str, size: int = 8) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: collections.deque[tuple[bool, Any]] = collections.deque()
        self._size = size
        self._consumer: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._stopped: BaseException | None = None
        self._finished = False
        self._running = len(sources)
        self._sources = dict(sources)
        self._tasks = [
            start_task(self._read(key, source), name=f"{name}:{key}", forever=False)
            for key, source in self._sources.items()
        ]
        if not self._sources:
            self._items.append((False, END))

    async def _read(self, key: K, source: AsyncIterator[Any]) -> None:
        try:
            async for item in source:
                await self._put((True, (key, item)))
        except Exception as exc:  # handed to the handler, which decides what it means
            await self._put((False, exc))
            return
        self._running -= 1
        if self._running == 0:
            await self._put((False, END))

    async def _put(self, entry: tuple[bool, Any]) -> None:
        while len(self._items) >= self._size:
            self._space = self._loop.create_future()
            await self._space
        self._items.append(entry)
        _wake(self._consumer)

    async def get(self, timeout: float | None) -> Any:  # noqa: ASYNC109 - TIMEOUT is an answer, not an error
        """The next ``(key, item)``, :data:`END`, or :data:`TIMEOUT` after ``timeout`` seconds."""
        while True:
            if self._stopped is not None:
                raise self._stopped
            if self._finished:
                return END
            if self._items:
                ok, item = self._items.popleft()
                _wake(self._space)
                if ok:
                    return item
                self._finished = True
                if isinstance(item, BaseException):
                    raise item
                return END
            waiter = self._consumer = self._loop.create_future()
            expired: list[bool] = []
            timer = None
            if timeout is not None:
                timer = self._loop.call_later(max(timeout, 0.0), _expire, waiter, expired)
            try:
                await waiter
            finally:
                self._consumer = None
                if timer is not None:
                    timer.cancel()
            if expired and not self._items and self._stopped is None:
                return TIMEOUT

    def take_ready(self, accept: Callable[[Any], bool]) -> Any:
        """The next ``(key, item)`` if it is already here and ``accept(item)``, else None.

        Never waits: handlers use it to merge what has piled up into one message.
        """
        if self._stopped is not None or not self._items:
            return None
        ok, item = self._items[0]
        if not ok or not accept(item[1]):
            return None
        self._items.popleft()
        _wake(self._space)
        return item

    def stop(self, error: BaseException) -> None:
        """End the hand-over: the handler's next :meth:`get` raises ``error``."""
        if self._stopped is None:
            self._stopped = error
        _wake(self._consumer)

    async def close(self) -> None:
        """Stop the readers (bounded wait) and close the sources."""
        await stop_tasks(self._tasks, grace=2.0)
        for source in self._sources.values():
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                # A source that fails while closing has nothing left to read.
                with contextlib.suppress(Exception):
                    await aclose()


def _expire(waiter: asyncio.Future[None], expired: list[bool]) -> None:
    expired.append(True)
    _wake(waiter)


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
