"""A session's input (stdin of an exec, the outgoing bytes of a port-forward), applied in order.

Browsers send input as separate unary calls (WriteTTY, WritePortForward), which can overtake one
another on their way (several HTTP/1.1 connections, HTTP/2 streams, a hub in between). With an
``offset`` (the position of the chunk in the session's input) chunks are applied strictly in
offset order: a chunk that starts beyond what was applied waits for the bytes before it, at most
``gap_timeout`` seconds (then :class:`~.._errors.InputGapError`, aborted); a chunk that was
already applied (a retry) is acknowledged without effect; one that overlaps contributes only its
new tail. Without an offset (the original's clients) a chunk is applied after the ones before it
in arrival order.

Memory is bounded: every chunk in flight (waiting for its turn or for a gap) counts against
``max_pending`` bytes; a chunk that would exceed it is refused (resource_exhausted), and a
cancelled write releases its share at once. A chunk is handed to the sink as a whole and that
step is shielded from the caller's cancellation, so a retry after a cancelled write can never
apply bytes twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .._errors import InputGapError, PreconditionError, SessionLimitError, SessionNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["OrderedInput", "Sink"]

#: Writes one chunk to the Kubernetes stream; ``close`` half-closes after it.
Sink = Callable[[bytes, bool], Awaitable[None]]


class OrderedInput:
    """Ordered, bounded input of one session (see the module docstring)."""

    def __init__(
        self,
        sink: Sink,
        *,
        max_pending: int,
        gap_timeout: float,
        what: str = "stdin",
        limit_key: str = "runtime.max_pending_bytes",
    ) -> None:
        self._sink = sink
        self._max_pending = max_pending
        self._gap_timeout = gap_timeout
        self._what = what
        self._limit_key = limit_key
        self._next = 0
        self._pending = 0
        self._closed = False
        self._ended = False
        self._turn = asyncio.Lock()
        #: Set (and replaced) whenever the input advances or ends: wakes writers after a gap.
        self._progress = asyncio.Event()
        #: Bytes applied so far (the next offset).
        self.applied = 0

    @property
    def closed(self) -> bool:
        """Whether the input was closed (``close_stdin`` / ``close_write``)."""
        return self._closed

    def end(self) -> None:
        """The session ended: writers waiting for a gap stop waiting."""
        self._ended = True
        self._wake()

    async def write(self, data: bytes, offset: int | None, close: bool) -> None:
        """Apply ``data`` (at ``offset``, or next) and, with ``close``, close the input after it."""
        size = len(data)
        if self._pending + size > self._max_pending:
            raise SessionLimitError(
                f"the session already holds {self._pending} bytes of {self._what} waiting to be "
                f"written; at most {self._max_pending} ({self._limit_key})"
            )
        self._pending += size
        try:
            if offset is not None and offset > self._next:
                await self._wait_for(offset)
            await self._turn.acquire()
            released = False
            try:
                if self._ended:
                    raise SessionNotFoundError()
                start = self._next if offset is None else offset
                skip = self._next - start
                if skip >= size and not (close and not self._closed):
                    return  # a duplicate (a retried write): already applied
                if self._closed:
                    raise PreconditionError(f"{self._what} is closed; nothing more can be written")
                chunk = data[skip:] if skip else data
                applying = asyncio.get_running_loop().create_task(
                    self._apply(chunk, close), name="runtime-input-apply"
                )
                # Whatever happens to this caller, the chunk is applied whole and the next
                # writer's turn starts only after it.
                applying.add_done_callback(self._applied)
                released = True
                await asyncio.shield(applying)
            finally:
                if not released:
                    self._turn.release()
        finally:
            self._pending -= size

    def _applied(self, task: asyncio.Task[None]) -> None:
        self._turn.release()
        if not task.cancelled() and task.exception() is not None:
            logger.debug("writing %s failed: %s", self._what, task.exception())

    async def _apply(self, chunk: bytes, close: bool) -> None:
        await self._sink(chunk, close)
        self._next += len(chunk)
        self.applied = self._next
        if close:
            self._closed = True
        self._wake()

    async def _wait_for(self, offset: int) -> None:
        try:
            async with asyncio.timeout(self._gap_timeout):
                while self._next < offset and not self._ended:
                    await self._progress.wait()
        except TimeoutError:
            raise InputGapError(
                f"{self._what} bytes {self._next}..{offset} did not arrive within "
                f"{self._gap_timeout:g}s; write from offset {self._next} again"
            ) from None

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()
