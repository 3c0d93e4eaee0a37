"""Fan-out budgets (pure, on the event loop): legs per subject and hub, in-flight legs per cluster."""

from __future__ import annotations

import asyncio

import pytest

from otterscale.hub._fanout.budget import ClusterLanes, SubjectLegs
from otterscale.hub._fanout.errors import FanoutLimitError


def test_legs_per_subject_and_watch_legs_per_hub() -> None:
    legs = SubjectLegs(per_subject=10, watch_total=12)
    legs.acquire("alice", 8)
    with pytest.raises(FanoutLimitError, match=r"fanout\.max_legs_per_subject"):
        legs.acquire("alice", 3)
    legs.acquire("bob", 10, watch=True)
    with pytest.raises(FanoutLimitError, match=r"fanout\.max_watch_legs"):
        legs.acquire("carol", 3, watch=True)
    assert (legs.held("alice"), legs.held("carol")) == (8, 0)  # a refused acquire takes nothing
    legs.release("bob", 10, watch=True)
    legs.acquire("alice", 2, watch=True)
    assert (legs.held("alice"), legs.held("bob"), legs.watch_legs) == (10, 0, 2)


async def test_a_cluster_never_has_more_legs_in_flight_than_its_cap() -> None:
    lanes = ClusterLanes(per_cluster=3)
    running = 0
    most = 0

    async def leg() -> None:
        nonlocal running, most
        async with lanes.slot("east", "alice"):
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.001)
            running -= 1

    await asyncio.gather(*(leg() for _ in range(20)))
    assert most == 3
    assert lanes.peak["east"] == 3
    assert lanes.inflight("east") == 0


async def test_waiting_legs_are_served_round_robin_by_subject() -> None:
    lanes = ClusterLanes(per_cluster=1)
    order: list[str] = []
    gate = asyncio.Event()

    async def leg(subject: str) -> None:
        async with lanes.slot("east", subject):
            order.append(subject)
            await gate.wait()

    holder = asyncio.create_task(leg("first"))
    await asyncio.sleep(0)
    # A fleet scan queues many legs, a small caller queues two: they alternate.
    tasks = [asyncio.create_task(leg("scanner")) for _ in range(5)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(leg("small")) for _ in range(2)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(holder, *tasks)
    assert order == ["first", "scanner", "small", "scanner", "small", "scanner", "scanner", "scanner"]


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    lanes = ClusterLanes(per_cluster=1)
    release = asyncio.Event()

    async def hold() -> None:
        async with lanes.slot("east", "a"):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    assert lanes.inflight("east") == 0
    async with asyncio.timeout(1):
        async with lanes.slot("east", "b"):
            assert lanes.inflight("east") == 1
