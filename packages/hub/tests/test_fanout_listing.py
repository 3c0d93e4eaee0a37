"""MultiList's paging logic (pure): FAIR turns and shares, CLUSTER_MAJOR order, retries, expiry,
timeouts, byte shares. The hub's door to agents (:class:`AgentLegs`) is replaced by scripted
clusters that page through their items like kube-apiserver; the real path is tested in
tests/e2e/fanout."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from otterscale.common import Identity
from otterscale.hub._access import AccessPolicy
from otterscale.hub._codec import CODEC_PROTO, RawMessage
from otterscale.hub._fanout.budget import ClusterLanes, SubjectLegs
from otterscale.hub._fanout.legs import LegFailure, ResponseTooLarge
from otterscale.hub._fanout.listing import ListSettings, MultiLister
from otterscale.hub._fanout.selection import ClusterDirectory
from otterscale.hub._fanout.tokens import TokenSealer, derive_token_key
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.multicluster_pb2 import (
    ClusterSelection,
    ClusterStatus,
    FanoutOptions,
    MultiListRequest,
    MultiListResponse,
    ResourceQuery,
)

Outcome = ClusterStatus.Outcome
ALICE = Identity("alice")
QUERY = ResourceQuery(version="v1", resource="configmaps")
#: What a scripted cluster does instead of answering: called with the request, returns nothing
#: (then the cluster answers) or raises.
Fault = Callable[[pb.ListRequest], None]


@dataclass
class Cluster:
    items: int
    faults: list[Fault] = field(default_factory=list)
    snapshot: int = 100
    asked: list[pb.ListRequest] = field(default_factory=list)


@dataclass
class ScriptedClusters:
    """Stands in for AgentLegs: each cluster pages through ``items`` objects (continue = offset)."""

    clusters: dict[str, Cluster]
    item_bytes: int = 200

    def connected(self, cluster: str) -> bool:
        return self.clusters[cluster].items >= 0

    async def list(
        self, cluster: str, identity: Identity, request: RawMessage, *, within: float, max_bytes: int
    ) -> bytes:
        asked = pb.ListRequest.FromString(request.data)
        state = self.clusters[cluster]
        state.asked.append(asked)
        if state.faults:
            fault = state.faults.pop(0)
            fault(asked)
        start = int(getattr(asked, "continue") or 0)
        end = min(state.items, start + (asked.limit or state.items))
        if (end - start) * self.item_bytes > max_bytes:
            raise ResponseTooLarge()
        response = pb.ListResponse(resource_version=str(state.snapshot))
        for i in range(start, end):
            response.items.add().object.update(
                {"metadata": {"name": f"{cluster}-{i:05d}", "pad": "x" * (self.item_bytes - 60)}}
            )
        if end < state.items:
            setattr(response, "continue", str(end))
        return response.SerializeToString()


def lister(clusters: dict[str, Cluster], *, item_bytes: int = 200, **settings: Any) -> MultiLister:
    labels: dict[str, dict[str, str]] = {name: {} for name in clusters}
    return MultiLister(
        legs=ScriptedClusters(clusters, item_bytes),  # type: ignore[arg-type]
        directory=ClusterDirectory(labels, AccessPolicy(None, labels), max_clusters=1000),
        sealer=TokenSealer(derive_token_key(b"k" * 32)),
        lanes=ClusterLanes(8),
        subject_legs=SubjectLegs(10_000, 10_000),
        settings=ListSettings(**settings),
    )


async def traverse(
    found: MultiLister,
    *,
    limit: int = 0,
    order: int = 0,
    clusters: list[str] | None = None,
    leg_seconds: float = 0,
) -> list[MultiListResponse]:
    options = FanoutOptions()
    if leg_seconds:
        options.per_cluster_timeout.FromNanoseconds(int(leg_seconds * 1e9))
    request = MultiListRequest(
        selection=ClusterSelection(clusters=clusters or []),
        query=QUERY,
        limit=limit,
        order=order,
        options=options,  # type: ignore[arg-type]
    )
    pages = []
    for _ in range(1000):
        page = MultiListResponse.FromString(await found.page(ALICE, request, CODEC_PROTO, 30.0))
        pages.append(page)
        if not page.next_cursor:
            return pages
        request.cursor = page.next_cursor
    raise AssertionError("the traversal did not end")


def names(pages: list[MultiListResponse]) -> Counter[str]:
    return Counter(
        item.object.fields["metadata"].struct_value.fields["name"].string_value
        for page in pages
        for part in page.lists
        for item in part.list.items
    )


def last(pages: list[MultiListResponse]) -> dict[str, ClusterStatus]:
    found: dict[str, ClusterStatus] = {}
    for page in pages:
        for status in page.statuses:
            found[status.cluster] = status
    return found


async def test_fair_clusters_take_turns_in_legs_of_at_least_a_hundred_items() -> None:
    clusters = {f"c{i:02d}": Cluster(250) for i in range(20)}
    pages = await traverse(lister(clusters), limit=500)
    found = names(pages)
    assert len(found) == 20 * 250
    assert max(found.values()) == 1
    assert all(sum(len(p.list.items) for p in page.lists) <= 500 for page in pages)
    # Five legs of 100 a page, in name order, then the next five: every cluster takes turns.
    assert [p.cluster for p in pages[0].lists] == ["c00", "c01", "c02", "c03", "c04"]
    assert [p.cluster for p in pages[1].lists] == ["c05", "c06", "c07", "c08", "c09"]
    assert all(len(p.list.items) == 100 for p in pages[0].lists)
    assert len(pages) == 12  # each cluster in legs of 100, 100 and 50
    assert pages[-1].resume
    assert {v.cluster: v.resource_version for v in pages[-1].resource_versions} == dict.fromkeys(
        clusters, "100"
    )


async def test_a_small_limit_is_a_hard_maximum() -> None:
    clusters = {name: Cluster(5) for name in ("a", "b", "c")}
    pages = await traverse(lister(clusters), limit=2)
    assert all(sum(len(p.list.items) for p in page.lists) <= 2 for page in pages)
    assert names(pages) == Counter({f"{c}-{i:05d}": 1 for c in "abc" for i in range(5)})


async def test_cluster_major_is_one_cluster_after_the_other() -> None:
    clusters = {name: Cluster(130) for name in ("a", "b", "c")}
    pages = await traverse(lister(clusters), limit=100, order=MultiListRequest.ORDER_CLUSTER_MAJOR)
    sequence = [
        name[0] for page in pages for part in page.lists for name in (part.cluster,) * len(part.list.items)
    ]
    assert sequence == sorted(sequence)
    assert len(names(pages)) == 390


async def test_an_unavailable_cluster_is_tried_again_on_a_later_page() -> None:
    def cut(_: pb.ListRequest) -> None:
        raise LegFailure(Outcome.OUTCOME_UNAVAILABLE, "cut")

    clusters = {"a": Cluster(300, faults=[cut]), "b": Cluster(300)}
    pages = await traverse(lister(clusters), limit=200)
    assert len(names(pages)) == 600
    assert last(pages)["a"].outcome == Outcome.OUTCOME_OK
    assert Outcome.OUTCOME_UNAVAILABLE in [s.outcome for s in pages[0].statuses if s.cluster == "a"]


async def test_retries_never_make_the_traversal_longer() -> None:
    def down(_: pb.ListRequest) -> None:
        raise LegFailure(Outcome.OUTCOME_UNAVAILABLE, "down")

    clusters = {"a": Cluster(100, faults=[down] * 10), "b": Cluster(100)}
    pages = await traverse(lister(clusters), limit=200)
    assert len(pages) <= 2
    status = last(pages)["a"]
    assert (status.outcome, status.final) == (Outcome.OUTCOME_UNAVAILABLE, True)
    assert len(names(pages)) == 100


async def test_an_expired_snapshot_starts_over_only_when_nothing_was_returned() -> None:
    def expire(request: pb.ListRequest) -> None:
        if getattr(request, "continue"):
            raise LegFailure(Outcome.OUTCOME_EXPIRED, "the continue parameter is too old")

    fresh = {"a": Cluster(250)}
    found = lister(fresh)
    first = MultiListResponse.FromString(
        await found.page(ALICE, MultiListRequest(query=QUERY, limit=100), CODEC_PROTO, 30.0)
    )
    fresh["a"].faults.append(expire)
    rest = MultiListRequest(query=QUERY, limit=100, cursor=first.next_cursor)
    second = MultiListResponse.FromString(await found.page(ALICE, rest, CODEC_PROTO, 30.0))
    # a had returned items: starting over would repeat them, so it ends EXPIRED.
    assert [(s.outcome, s.final) for s in second.statuses] == [(Outcome.OUTCOME_EXPIRED, True)]
    assert not second.next_cursor


async def test_a_leg_that_never_answers_times_out_alone() -> None:
    async_hang = asyncio.Event()

    clusters = {"a": Cluster(10), "b": Cluster(10)}
    scripted = ScriptedClusters(clusters)
    original = scripted.list

    async def hanging(cluster: str, *args: Any, **kwargs: Any) -> bytes:
        if cluster == "b":
            await async_hang.wait()
        return await original(cluster, *args, **kwargs)

    found = lister(clusters)
    found._legs.list = hanging  # type: ignore[method-assign]
    pages = await traverse(found, leg_seconds=0.2)
    assert last(pages)["b"].outcome == Outcome.OUTCOME_TIMEOUT
    assert last(pages)["b"].final
    assert last(pages)["a"].outcome == Outcome.OUTCOME_OK


async def test_an_answer_over_its_byte_share_is_asked_again_smaller() -> None:
    clusters = {"a": Cluster(1000)}
    # 1,000 items of 2,000 bytes are over the smallest byte share a leg gets (1 MiB).
    pages = await traverse(lister(clusters, item_bytes=2000, page_bytes=64 * 1024), limit=1000)
    assert len(names(pages)) == 1000
    asked = [r.limit for r in clusters["a"].asked]
    assert asked[0] == 1000
    assert asked[1] < asked[0]  # halved after the first answer was over the share


@pytest.mark.parametrize("limit", [-1, 10**9])
async def test_bad_limits_are_invalid(limit: int) -> None:
    from otterscale.hub._fanout.errors import InvalidFanoutRequestError

    with pytest.raises(InvalidFanoutRequestError, match="limit"):
        await lister({"a": Cluster(1)}).page(
            ALICE, MultiListRequest(query=QUERY, limit=limit), CODEC_PROTO, 30.0
        )
