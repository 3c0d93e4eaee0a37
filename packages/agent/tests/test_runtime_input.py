"""Ordered, bounded session input (``_input.OrderedInput``): the rules of WriteTTY/WritePortForward.

The sink records what would go to Kubernetes, so these tests see exactly which bytes are applied
in which order; the waiting is real asyncio waiting (gap timeouts are set short here).
"""

from __future__ import annotations

import asyncio

import pytest

from otterscale.agent._errors import InputGapError, PreconditionError, SessionLimitError, SessionNotFoundError
from otterscale.agent._runtime._input import OrderedInput


class Sink:
    def __init__(self, delay: float = 0.0) -> None:
        self.chunks: list[bytes] = []
        self.closed = False
        self.delay = delay
        self.entered = asyncio.Event()

    async def __call__(self, data: bytes, close: bool) -> None:
        # Like a WebSocket send: the bytes are on their way, then the sender waits for the buffer
        # to drain (where a cancellation can hit it).
        self.chunks.append(data)
        if close:
            self.closed = True
        self.entered.set()
        if self.delay:
            await asyncio.sleep(self.delay)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def make(sink: Sink, *, max_pending: int = 1024, gap_timeout: float = 5.0) -> OrderedInput:
    return OrderedInput(sink, max_pending=max_pending, gap_timeout=gap_timeout)


async def test_without_offsets_arrival_order() -> None:
    sink = Sink()
    stream = make(sink)
    for piece in (b"a", b"b", b"c"):
        await stream.write(piece, None, False)
    assert sink.data == b"abc"
    assert stream.applied == 3


async def test_out_of_order_offsets_are_applied_in_order() -> None:
    sink = Sink()
    stream = make(sink)
    later = asyncio.ensure_future(stream.write(b"world", 6, False))
    middle = asyncio.ensure_future(stream.write(b" ", 5, False))
    await asyncio.sleep(0)  # both are waiting for the gap
    assert sink.chunks == []
    await stream.write(b"hello", 0, False)
    await asyncio.gather(later, middle)
    assert sink.data == b"hello world"


async def test_a_retried_chunk_is_acknowledged_without_effect() -> None:
    sink = Sink()
    stream = make(sink)
    await stream.write(b"abc", 0, False)
    await stream.write(b"abc", 0, False)  # the retry of a write whose answer was lost
    await stream.write(b"bc", 1, False)
    assert sink.data == b"abc"


async def test_an_overlapping_chunk_adds_only_its_new_tail() -> None:
    sink = Sink()
    stream = make(sink)
    await stream.write(b"abc", 0, False)
    await stream.write(b"cde", 2, False)
    assert sink.chunks == [b"abc", b"de"]


async def test_a_gap_that_never_fills_is_aborted_and_frees_its_bytes() -> None:
    sink = Sink()
    stream = make(sink, max_pending=10, gap_timeout=0.05)
    with pytest.raises(InputGapError, match=r"bytes 0\.\.5 did not arrive"):
        await stream.write(b"0123456789", 5, False)
    assert sink.chunks == []
    await stream.write(b"0123456789", 0, False)  # the pending budget is free again
    assert sink.data == b"0123456789"


async def test_pending_bytes_are_bounded() -> None:
    sink = Sink()
    stream = make(sink, max_pending=8, gap_timeout=5.0)
    waiting = asyncio.ensure_future(stream.write(b"123456", 10, False))
    await asyncio.sleep(0)
    with pytest.raises(SessionLimitError, match=r"runtime\.max_pending_bytes"):
        await stream.write(b"abcdef", 16, False)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # A cancelled writer releases its share at once.
    await stream.write(b"12345678", 0, False)
    assert sink.data == b"12345678"


async def test_close_then_write_is_refused_and_a_retried_close_is_fine() -> None:
    sink = Sink()
    stream = make(sink)
    await stream.write(b"last", 0, True)
    assert sink.closed
    assert stream.closed
    await stream.write(b"last", 0, True)  # retry of the closing write: acknowledged
    assert sink.chunks == [b"last"]
    with pytest.raises(PreconditionError, match="closed"):
        await stream.write(b"more", 4, False)
    with pytest.raises(PreconditionError, match="closed"):
        await stream.write(b"more", None, False)


async def test_close_without_data() -> None:
    sink = Sink()
    stream = make(sink)
    await stream.write(b"", None, True)
    assert sink.closed
    assert sink.chunks == [b""]


async def test_a_writer_cancelled_while_its_chunk_is_written_cannot_duplicate_it() -> None:
    sink = Sink(delay=0.05)
    stream = make(sink)
    first = asyncio.ensure_future(stream.write(b"abc", 0, False))
    await sink.entered.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # The client retries the same chunk: it was applied whole, once.
    await stream.write(b"abc", 0, False)
    await stream.write(b"d", 3, False)
    assert sink.data == b"abcd"


async def test_ending_the_session_releases_waiting_writers() -> None:
    sink = Sink()
    stream = make(sink, gap_timeout=30.0)
    waiting = asyncio.ensure_future(stream.write(b"x", 5, False))
    await asyncio.sleep(0)
    stream.end()
    with pytest.raises(SessionNotFoundError):
        await asyncio.wait_for(waiting, 5.0)
    with pytest.raises(SessionNotFoundError):
        await stream.write(b"y", None, False)
