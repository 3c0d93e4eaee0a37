"""``_pump.Pump``: items in order, timeouts, the end, errors, stop, and a bounded buffer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from otterscale.agent._errors import ShuttingDownError
from otterscale.agent._runtime._pump import END, TIMEOUT, Pump


async def items(
    values: list[int], *, fail: Exception | None = None, produced: list[int] | None = None
) -> AsyncIterator[int]:
    for value in values:
        if produced is not None:
            produced.append(value)
        yield value
    if fail is not None:
        raise fail


async def forever() -> AsyncIterator[int]:
    await asyncio.Event().wait()
    yield 0


async def test_items_then_end() -> None:
    pump = Pump({"a": items([1, 2, 3])}, name="test-pump")
    try:
        got = [await pump.get(5.0) for _ in range(3)]
        assert got == [("a", 1), ("a", 2), ("a", 3)]
        assert await pump.get(5.0) is END
        assert await pump.get(5.0) is END
    finally:
        await pump.close()


async def test_timeout_when_nothing_comes() -> None:
    pump = Pump({"a": forever()}, name="test-pump")
    try:
        assert await pump.get(0.01) is TIMEOUT
    finally:
        await pump.close()


async def test_a_source_error_comes_after_the_items_read_before_it() -> None:
    pump = Pump({"a": items([1], fail=ValueError("broken"))}, name="test-pump")
    try:
        assert await pump.get(5.0) == ("a", 1)
        with pytest.raises(ValueError, match="broken"):
            await pump.get(5.0)
    finally:
        await pump.close()


async def test_stop_wakes_a_waiting_get_with_the_error() -> None:
    pump = Pump({"a": forever()}, name="test-pump")
    try:
        waiting = asyncio.ensure_future(pump.get(None))
        await asyncio.sleep(0)
        pump.stop(ShuttingDownError("bye"))
        with pytest.raises(ShuttingDownError, match="bye"):
            await asyncio.wait_for(waiting, 5.0)
    finally:
        await pump.close()


async def test_several_sources_end_once_all_ended() -> None:
    pump = Pump({"a": items([1]), "b": items([2, 3])}, name="test-pump")
    try:
        got = set()
        while (item := await pump.get(5.0)) is not END:
            got.add(item)
        assert got == {("a", 1), ("b", 2), ("b", 3)}
    finally:
        await pump.close()


async def test_the_buffer_is_bounded() -> None:
    produced: list[int] = []
    pump = Pump({"a": items(list(range(100)), produced=produced)}, name="test-pump", size=4)
    try:
        for _ in range(10):
            await asyncio.sleep(0)
        # Four are buffered and the fifth waits to be put: the source is not read ahead.
        assert len(produced) <= 5
        assert await pump.get(5.0) == ("a", 0)
    finally:
        await pump.close()
    assert len(produced) <= 7


async def test_take_ready_only_takes_what_is_there_and_accepted() -> None:
    pump = Pump({"a": items([1, 2, 30, 4])}, name="test-pump")
    try:
        assert await pump.get(5.0) == ("a", 1)
        for _ in range(10):
            await asyncio.sleep(0)  # the reader fills the buffer
        assert pump.take_ready(lambda item: item < 10) == ("a", 2)
        assert pump.take_ready(lambda item: item < 10) is None  # 30 is next: not accepted, not taken
        assert await pump.get(5.0) == ("a", 30)
        assert pump.take_ready(lambda item: True) == ("a", 4)
        assert pump.take_ready(lambda item: True) is None  # the end is not an item
        assert await pump.get(5.0) is END
    finally:
        await pump.close()
