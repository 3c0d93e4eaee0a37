"""``EndableStream``: a relayed stream ended early (drain, lost leadership) is never cut mid-send.

Pure logic, no server: the "caller" is a consumer that takes the relayed messages and, for each,
awaits a delivery the test controls (as connectrpc's send awaits the server). The real-process
side is ``test_limits::test_open_watches_end_with_unavailable_on_hub_drain``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from otterscale.hub import _passthrough
from otterscale.hub._passthrough import EndableStream

REASON = "test-shutdown"


async def upstream(messages: asyncio.Queue[str]) -> AsyncIterator[str]:
    while True:
        yield await messages.get()


class Caller:
    """Takes each message and then waits in "send" until the test lets the delivery finish."""

    def __init__(self, stream: AsyncIterator[str]) -> None:
        self.stream = stream
        self.delivered: list[str] = []
        self.sending = asyncio.Event()
        self.sent = asyncio.Event()
        self.ended_with: BaseException | None = None

    async def run(self) -> None:
        try:
            async for message in self.stream:
                self.sending.set()
                await self.sent.wait()  # the send: a cancellation here cuts the response
                self.sent.clear()
                self.sending.clear()
                self.delivered.append(message)
        except asyncio.CancelledError as exc:
            self.ended_with = exc
            raise


async def relayed(messages: asyncio.Queue[str]) -> tuple[EndableStream, Caller, asyncio.Task[None]]:
    caller: Caller | None = None
    ready = asyncio.Event()
    endable: EndableStream | None = None

    async def handler() -> None:
        nonlocal caller, endable
        task = asyncio.current_task()
        assert task is not None
        endable = EndableStream(task)
        caller = Caller(endable.relay(upstream(messages)))
        ready.set()
        await caller.run()

    task = asyncio.create_task(handler())
    await ready.wait()
    assert endable is not None
    assert caller is not None
    return endable, caller, task


async def test_an_end_while_waiting_for_the_next_hop_cancels_at_once() -> None:
    messages: asyncio.Queue[str] = asyncio.Queue()
    endable, caller, task = await relayed(messages)
    await asyncio.sleep(0)  # waiting for upstream
    endable.end(REASON)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert caller.ended_with is not None
    assert caller.ended_with.args == (REASON,)


async def test_an_end_while_delivering_waits_for_the_delivery_then_ends() -> None:
    messages: asyncio.Queue[str] = asyncio.Queue()
    endable, caller, task = await relayed(messages)
    await messages.put("event-1")
    await caller.sending.wait()
    endable.end(REASON)
    endable.end("a second reason is ignored")
    await asyncio.sleep(0.05)
    assert not task.done(), "the delivery in progress was cut"
    caller.sent.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert caller.delivered == ["event-1"]
    assert caller.ended_with is not None
    assert caller.ended_with.args == (REASON,)
    assert task.cancelling() == 0, "the task itself was never cancelled"


async def test_a_delivery_that_never_finishes_is_cut_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_passthrough, "DELIVERY_GRACE_SECONDS", 0.05)
    messages: asyncio.Queue[str] = asyncio.Queue()
    endable, caller, task = await relayed(messages)
    await messages.put("event-1")
    await caller.sending.wait()
    endable.end(REASON)  # the caller never takes the message
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert caller.delivered == []
    assert caller.ended_with is not None
    assert caller.ended_with.args == (REASON,)
