"""MultiList through the real hub, agents, tunnels and control planes (fanout.md 4.2, 1-9).

Every item set is checked against what each cluster's own kube-apiserver lists for the same user;
every traversal is checked for items returned twice and items missing, across pages.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections import Counter
from collections.abc import Sequence

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf.duration_pb2 import Duration

from otterscale.hub._fanout.listing import cursor_binding
from otterscale.hub._fanout.query import Query
from otterscale.hub._fanout.tokens import CURSOR, TokenSealer, derive_token_key
from otterscale.resource.v1.multicluster_connect import MultiClusterServiceClient
from otterscale.resource.v1.multicluster_pb2 import (
    ClusterSelection,
    ClusterStatus,
    FanoutOptions,
    MultiListRequest,
    MultiListResponse,
    ResourceQuery,
)

from .conftest import (
    LABELS,
    PER_NAMESPACE,
    PREVIOUS_TOKEN_KEY,
    RETIRED_TOKEN_KEY,
    TOKEN_KEY,
    Clients,
    Fleet,
    wait_connected,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

Outcome = ClusterStatus.Outcome
OK = Outcome.OUTCOME_OK
CONFIGMAPS = ResourceQuery(version="v1", resource="configmaps")
WIDGETS = ResourceQuery(group="example.com", version="v1", resource="widgets")
#: Most pages any traversal here may take (a bound, so a cursor bug cannot loop forever).
MAX_PAGES = 2000


def request(
    clusters: Sequence[str] = (),
    *,
    query: ResourceQuery = CONFIGMAPS,
    limit: int = 0,
    order: int = MultiListRequest.ORDER_FAIR,
    timeout: float | None = None,
    require_all: bool = False,
    label_selector: str = "",
    concurrency: int = 0,
) -> MultiListRequest:
    options = FanoutOptions(require_all=require_all, max_concurrency=concurrency)
    if timeout is not None:
        options.per_cluster_timeout.CopyFrom(Duration(seconds=int(timeout), nanos=int((timeout % 1) * 1e9)))
    return MultiListRequest(
        selection=ClusterSelection(clusters=list(clusters), label_selector=label_selector),
        query=query,
        limit=limit,
        order=order,  # type: ignore[arg-type]
        options=options,
    )


async def traverse(
    client: MultiClusterServiceClient, first: MultiListRequest, headers: dict[str, str]
) -> list[MultiListResponse]:
    """Every page of a traversal, following next_cursor."""
    pages = []
    message = MultiListRequest()
    message.CopyFrom(first)
    for _ in range(MAX_PAGES):
        page = await client.multi_list(message, headers=headers)
        pages.append(page)
        if not page.next_cursor:
            return pages
        message.cursor = page.next_cursor
    raise AssertionError(f"the traversal did not end within {MAX_PAGES} pages")


def items(pages: Sequence[MultiListResponse]) -> Counter[tuple[str, str, str]]:
    """(cluster, namespace, name) of every item of every page, counted."""
    found: Counter[tuple[str, str, str]] = Counter()
    for page in pages:
        for part in page.lists:
            for item in part.list.items:
                metadata = item.object.fields["metadata"].struct_value.fields
                namespace = metadata["namespace"].string_value if "namespace" in metadata else ""
                found[(part.cluster, namespace, metadata["name"].string_value)] += 1
    return found


def final_statuses(pages: Sequence[MultiListResponse]) -> dict[str, ClusterStatus]:
    """The last status each cluster got in the traversal."""
    last: dict[str, ClusterStatus] = {}
    for page in pages:
        for status in page.statuses:
            last[status.cluster] = status
    return last


def of_cluster(found: Counter[tuple[str, str, str]], cluster: str) -> set[tuple[str, str]]:
    return {(ns, name) for (c, ns, name) in found if c == cluster}


async def test_every_cluster_gets_its_own_outcome(fleet: Fleet, clients: Clients) -> None:
    """4.2.1: a-full OK, b-ns and c-none FORBIDDEN (their own RBAC), d-down UNAVAILABLE without
    being dialled, f-nocrd OK; items equal each cluster's own List; nothing twice."""
    client = clients.multi()
    dialled = fleet.hub_metric(
        "otterscale_hub_agent_roundtrip_seconds_count", cluster="d-down", method="MultiList"
    )
    pages = await traverse(
        client, request(["a-full", "b-ns", "c-none", "d-down", "f-nocrd"], limit=150), fleet.auth("alice")
    )
    statuses = final_statuses(pages)
    assert {name: Outcome.Name(s.outcome) for name, s in statuses.items()} == {
        "a-full": "OUTCOME_OK",
        "b-ns": "OUTCOME_FORBIDDEN",
        "c-none": "OUTCOME_FORBIDDEN",
        "d-down": "OUTCOME_UNAVAILABLE",
        "f-nocrd": "OUTCOME_OK",
    }
    assert statuses["b-ns"].code == "permission_denied"
    assert all(s.final for s in statuses.values())
    found = items(pages)
    assert max(found.values()) == 1, "an item came twice"
    for cluster in ("a-full", "f-nocrd"):
        assert of_cluster(found, cluster) == fleet.truth(cluster)
        assert (
            len({key for key in of_cluster(found, cluster) if key[0].startswith("team-")})
            == PER_NAMESPACE * 5
        )
    assert not of_cluster(found, "b-ns")
    # d-down was answered from the hub's tunnel state: never dialled.
    assert (
        fleet.hub_metric("otterscale_hub_agent_roundtrip_seconds_count", cluster="d-down", method="MultiList")
        == dialled
    )
    # A cluster's message says nothing about another cluster (its names, its objects).
    for name in ("b-ns", "c-none", "d-down"):
        assert "a-full" not in statuses[name].message
        assert "f-nocrd" not in statuses[name].message
    last = pages[-1]
    assert last.resume
    assert {v.cluster for v in last.resource_versions} == {"a-full", "f-nocrd"}
    assert last.progress.clusters_total == 5
    assert last.progress.clusters_done == 2
    assert last.progress.clusters_failed == 3
    assert last.progress.items_returned == len(found)


async def test_the_namespace_a_role_allows_is_listed(fleet: Fleet, clients: Clients) -> None:
    pages = await traverse(
        clients.multi(),
        request(
            ["b-ns", "c-none"], query=ResourceQuery(version="v1", resource="configmaps", namespace="team-a")
        ),
        fleet.auth("alice"),
    )
    statuses = final_statuses(pages)
    assert statuses["b-ns"].outcome == OK
    assert statuses["c-none"].outcome == Outcome.OUTCOME_FORBIDDEN
    assert of_cluster(items(pages), "b-ns") == fleet.truth("b-ns", namespace="team-a")


async def test_a_resource_a_cluster_does_not_serve(fleet: Fleet, clients: Clients) -> None:
    pages = await traverse(
        clients.multi(), request(["a-full", "c-none", "f-nocrd"], query=WIDGETS), fleet.auth("alice")
    )
    statuses = final_statuses(pages)
    assert statuses["a-full"].outcome == OK
    assert statuses["f-nocrd"].outcome == Outcome.OUTCOME_NOT_SERVED
    assert statuses["c-none"].outcome == Outcome.OUTCOME_FORBIDDEN
    assert of_cluster(items(pages), "a-full") == fleet.truth("a-full", resource="widgets")


@pytest.mark.parametrize("order", [MultiListRequest.ORDER_FAIR, MultiListRequest.ORDER_CLUSTER_MAJOR])
@pytest.mark.parametrize(("limit", "selector"), [(1, "idx=3"), (7, "idx in (1,2)"), (500, ""), (0, "")])
async def test_a_traversal_returns_every_item_once(
    fleet: Fleet, clients: Clients, order: int, limit: int, selector: str
) -> None:
    """4.2.2: the union of the pages is each cluster's own List, no item twice, in both orders."""
    query = ResourceQuery(version="v1", resource="configmaps", label_selector=selector)
    clusters = ["a-full", "f-nocrd", "g-hole"]
    pages = await traverse(
        clients.multi(), request(clusters, query=query, limit=limit, order=order), fleet.auth("alice")
    )
    found = items(pages)
    assert max(found.values()) == 1
    for cluster in clusters:
        assert of_cluster(found, cluster) == fleet.truth(cluster, selector=selector), cluster
    page_limit = limit or 500
    assert all(sum(len(part.list.items) for part in page.lists) <= page_limit for page in pages)
    if order == MultiListRequest.ORDER_CLUSTER_MAJOR:
        sequence = [part.cluster for page in pages for part in page.lists if part.list.items]
        assert sequence == sorted(sequence), "cluster-major order: each cluster whole, in name order"
    assert all(s.outcome == OK for s in final_statuses(pages).values())


async def test_replaying_a_cursor_returns_the_same_page(fleet: Fleet, clients: Clients) -> None:
    client = clients.multi()
    first = await client.multi_list(request(["a-full", "f-nocrd"], limit=20), headers=fleet.auth("alice"))
    again = request(["a-full", "f-nocrd"], limit=20)
    again.cursor = first.next_cursor
    one = await client.multi_list(again, headers=fleet.auth("alice"))
    two = await client.multi_list(again, headers=fleet.auth("alice"))
    assert items([one]) == items([two])
    assert [p.list.SerializeToString() for p in one.lists] == [p.list.SerializeToString() for p in two.lists]


async def test_a_slow_cluster_times_out_alone_and_answers_with_time(fleet: Fleet, clients: Clients) -> None:
    """e-slow's relay adds ~0.8 s to every leg: a 0.3 s timeout is TIMEOUT (final), the others answer."""
    client = clients.multi()
    pages = await traverse(client, request(["a-full", "e-slow"], timeout=0.3), fleet.auth("alice"))
    statuses = final_statuses(pages)
    assert statuses["e-slow"].outcome == Outcome.OUTCOME_TIMEOUT
    assert statuses["e-slow"].final
    assert statuses["a-full"].outcome == OK
    pages = await traverse(client, request(["a-full", "e-slow"], timeout=30), fleet.auth("alice"))
    assert final_statuses(pages)["e-slow"].outcome == OK
    assert of_cluster(items(pages), "e-slow") == fleet.truth("e-slow")


async def test_a_black_holed_cluster_costs_one_timeout(fleet: Fleet, clients: Clients) -> None:
    """g-hole's tunnel stops passing bytes (nothing is closed): its leg ends at its timeout, the
    other clusters' items arrive in the same page, and later pages do not wait for it again."""
    relay = fleet.relays["g-hole"]
    client = clients.multi(timeout_ms=120_000)
    try:
        assert relay.freeze() >= 1
        started = time.monotonic()
        first = await client.multi_list(
            request(["a-full", "g-hole"], limit=200, timeout=2), headers=fleet.auth("alice")
        )
        elapsed = time.monotonic() - started
        statuses = {s.cluster: s for s in first.statuses}
        # TIMEOUT, or UNAVAILABLE if the hub's prober noticed the dead tunnel first.
        assert statuses["g-hole"].outcome in (Outcome.OUTCOME_TIMEOUT, Outcome.OUTCOME_UNAVAILABLE)
        assert statuses["a-full"].outcome == OK
        assert statuses["a-full"].items > 0
        # Bounded by the 2 s per-cluster timeout, not by the call's 120 s deadline (generous on a
        # loaded 2-core machine: the point is "not the deadline", the bench measures the cost).
        assert elapsed < 30, elapsed
        rest = request(["a-full", "g-hole"], limit=200, timeout=2)
        rest.cursor = first.next_cursor
        pages = [first, *await traverse(client, rest, fleet.auth("alice"))]
        assert of_cluster(items(pages), "a-full") == fleet.truth("a-full")
        tried = [s.cluster for page in pages[1:] for s in page.statuses if s.cluster == "g-hole"]
        assert tried in ([], ["g-hole"])  # reported at most once more (final status), never waited on
    finally:
        relay.thaw()
    await wait_connected(fleet, "g-hole")


async def test_an_expired_continue_token_ends_only_that_cluster(fleet: Fleet, clients: Clients) -> None:
    """4.2.4: f-nocrd's snapshot is compacted away between pages: EXPIRED (it already returned
    items, so starting over would repeat them); a-full completes."""
    client = clients.multi()
    # 200 a page: both clusters take part in it (at least 100 items a leg in FAIR order).
    first = await client.multi_list(request(["a-full", "f-nocrd"], limit=200), headers=fleet.auth("alice"))
    assert {s.cluster for s in first.statuses if s.outcome == OK} == {"a-full", "f-nocrd"}
    cp = fleet.plane("f-nocrd")
    # A write, then compaction of everything before it; kube-apiserver 1.36 serves continue tokens
    # from its watch cache's snapshots, so it is restarted too (a new one has only etcd, as after
    # any restart or after the cache moved on): the first page's snapshot is gone.
    cp.request(
        "PATCH",
        "/api/v1/namespaces/team-e/configmaps/cm-000",
        {"data": {"touched": str(time.time())}},
        content_type="application/merge-patch+json",
    )
    cp.compact()
    cp.restart_apiserver()  # from the test's (main) thread: see otterscale.testing._system
    rest = request(["a-full", "f-nocrd"], limit=200)
    rest.cursor = first.next_cursor
    pages = [first, *await traverse(client, rest, fleet.auth("alice"))]
    statuses = final_statuses(pages)
    assert statuses["f-nocrd"].outcome == Outcome.OUTCOME_EXPIRED, statuses["f-nocrd"]
    assert statuses["f-nocrd"].final
    assert statuses["a-full"].outcome == OK
    found = items(pages)
    assert max(found.values()) == 1
    assert of_cluster(found, "a-full") == fleet.truth("a-full")
    assert "f-nocrd" not in {v.cluster for v in pages[-1].resource_versions}


async def test_allow_lists_hide_clusters_like_unknown_ones(fleet: Fleet, clients: Clients) -> None:
    """4.2.6: bob (contractors) sees a-full only; naming c-none is the same answer as naming a
    cluster that does not exist, and neither is dialled; carol sees nothing and dials nothing."""
    client = clients.multi()
    pages = await traverse(client, request(), fleet.auth("bob"))
    assert set(final_statuses(pages)) == {"a-full"}
    assert of_cluster(items(pages), "a-full") == fleet.truth("a-full", user="bob")

    def dialled(cluster: str) -> float:
        return fleet.hub_metric(
            "otterscale_hub_agent_roundtrip_seconds_count", cluster=cluster, method="MultiList"
        )

    before = dialled("c-none")
    forbidden = await client.multi_list(request(["c-none"]), headers=fleet.auth("bob"))
    unknown = await client.multi_list(request(["no-such-cluster"]), headers=fleet.auth("bob"))
    assert dialled("c-none") == before
    assert len(forbidden.statuses) == len(unknown.statuses) == 1
    f, u = forbidden.statuses[0], unknown.statuses[0]
    assert (f.outcome, f.message, f.retryable, f.final, f.code) == (
        u.outcome,
        u.message,
        u.retryable,
        u.final,
        u.code,
    )
    assert f.outcome == Outcome.OUTCOME_UNKNOWN_CLUSTER
    assert forbidden.progress == unknown.progress
    assert not forbidden.lists
    assert not unknown.lists
    # Labels never reach a cluster the caller may not use.
    assert (
        set(final_statuses(await traverse(client, request(label_selector="env=dev"), fleet.auth("bob"))))
        == set()
    )

    counts = {name: dialled(name) for name in LABELS}
    empty = await client.multi_list(request(), headers=fleet.auth("carol"))
    assert not empty.statuses
    assert not empty.lists
    assert not empty.next_cursor
    assert {name: dialled(name) for name in LABELS} == counts


async def test_each_page_is_one_audit_event_with_every_clusters_outcome(
    fleet: Fleet, clients: Clients
) -> None:
    """3.5: one event per MultiList page (audited although a read), the query as its target, and
    per cluster the outcome and items the page reported; a cluster the access policy hides is
    ``permission_denied`` in the trail while the caller was told ``unknown_cluster``."""
    client = clients.multi()
    message = request(["a-full", "c-none", "d-down", "f-nocrd", "nope"], limit=150)
    pages = 0
    while True:
        request_id = f"fanout-audit-{uuid.uuid4().hex[:8]}"
        page = await client.multi_list(message, headers=fleet.auth("alice", **{"x-request-id": request_id}))
        event = await fleet.audit_event(request_id)
        assert (event["service"], event["verb"], event["code"]) == (
            "otterscale.resource.v1.MultiClusterService",
            "MultiList",
            "ok",
        )
        assert (event["subject"], event["cluster"], event["version"], event["resource"]) == (
            "alice",
            "",
            "v1",
            "configmaps",
        )
        reported = {
            status.cluster: (Outcome.Name(status.outcome).removeprefix("OUTCOME_").lower(), status.items)
            for status in page.statuses
        }
        assert {name: (c["outcome"], c["items"]) for name, c in event["clusters"].items()} == reported
        if pages == 0:  # an unknown cluster is reported once, on the first page
            assert event["clusters"]["nope"]["outcome"] == "unknown_cluster"
        pages += 1
        if not page.next_cursor:
            break
        assert pages < MAX_PAGES
        message.cursor = page.next_cursor
    assert pages > 1

    request_id = f"fanout-audit-{uuid.uuid4().hex[:8]}"
    page = await client.multi_list(
        request(["a-full", "c-none", "nope"]), headers=fleet.auth("bob", **{"x-request-id": request_id})
    )
    told = {status.cluster: Outcome.Name(status.outcome) for status in page.statuses}
    unknown = "OUTCOME_UNKNOWN_CLUSTER"
    assert told == {"a-full": "OUTCOME_OK", "c-none": unknown, "nope": unknown}
    event = await fleet.audit_event(request_id)
    assert {name: c["outcome"] for name, c in event["clusters"].items()} == {
        "a-full": "ok",
        "c-none": "permission_denied",
        "nope": "unknown_cluster",
    }
    assert event["clusters"]["a-full"]["items"] == len(fleet.truth("a-full", user="bob"))


async def test_label_selectors_pick_clusters(fleet: Fleet, clients: Clients) -> None:
    pages = await traverse(clients.multi(), request(label_selector="env=prod,tier=gold"), fleet.auth("alice"))
    assert set(final_statuses(pages)) == {"a-full"}


async def test_require_all_fails_with_every_status(fleet: Fleet, clients: Clients) -> None:
    """4.2.7: all or nothing: failed_precondition, each non-OK cluster's status in the details."""
    with pytest.raises(ConnectError) as caught:
        await clients.multi().multi_list(
            request(["a-full", "c-none", "d-down", "nope"], require_all=True), headers=fleet.auth("alice")
        )
    assert caught.value.code is Code.FAILED_PRECONDITION
    details = {}
    for detail in caught.value.details:
        status = ClusterStatus.FromString(detail.message_bytes)
        details[status.cluster] = status.outcome
    assert details == {
        "c-none": Outcome.OUTCOME_FORBIDDEN,
        "d-down": Outcome.OUTCOME_UNAVAILABLE,
        "nope": Outcome.OUTCOME_UNKNOWN_CLUSTER,
    }
    ok = await traverse(
        clients.multi(), request(["a-full", "f-nocrd"], require_all=True), fleet.auth("alice")
    )
    assert all(s.outcome == OK for s in final_statuses(ok).values())


@pytest.mark.security
async def test_cursors_are_bound_to_their_caller_and_query(fleet: Fleet, clients: Clients) -> None:
    """4.2.5: another user's cursor, another query's, a tampered or truncated one: all
    invalid_argument with one message; the owner can still use it."""
    client = clients.multi()
    first = await client.multi_list(request(["a-full"], limit=10), headers=fleet.auth("alice"))
    cursor = first.next_cursor
    raw = bytearray(base64.urlsafe_b64decode(cursor[5:] + "=" * (-len(cursor[5:]) % 4)))
    raw[len(raw) // 2] ^= 0x01
    tampered = cursor[:5] + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    attempts = {
        "bob": (request(["a-full"], limit=10), cursor, "bob"),
        "other resource": (request(["a-full"], limit=10, query=WIDGETS), cursor, "alice"),
        "other selector": (
            request(
                ["a-full"],
                limit=10,
                query=ResourceQuery(version="v1", resource="configmaps", label_selector="idx=1"),
            ),
            cursor,
            "alice",
        ),
        "other clusters": (request(["a-full", "f-nocrd"], limit=10), cursor, "alice"),
        "other order": (
            request(["a-full"], limit=10, order=MultiListRequest.ORDER_CLUSTER_MAJOR),
            cursor,
            "alice",
        ),
        "tampered": (request(["a-full"], limit=10), tampered, "alice"),
        "truncated": (request(["a-full"], limit=10), cursor[:-10], "alice"),
        "forged": (request(["a-full"], limit=10), "mlc1." + "A" * 200, "alice"),
    }
    messages = set()
    for what, (message, token, user) in attempts.items():
        message.cursor = token
        with pytest.raises(ConnectError) as caught:
            await client.multi_list(message, headers=fleet.auth(user))
        assert caught.value.code is Code.INVALID_ARGUMENT, what
        messages.add(caught.value.message)
    assert len(messages) == 1, messages
    owner = request(["a-full"], limit=10)
    owner.cursor = cursor
    assert (await client.multi_list(owner, headers=fleet.auth("alice"))).lists


@pytest.mark.security
async def test_cursors_of_an_old_hub_key_work_only_while_the_key_is_accepted(
    fleet: Fleet, clients: Clients
) -> None:
    """A cursor sealed with the previous key (``fanout.previous_token_keys``: a rotation under
    way) continues the traversal exactly like the current key's; one sealed with a key the hub no
    longer has is invalid_argument with the one message every refused cursor gets. The old hubs
    are this process sealing the hub's real cursor content with the hub's token code and their key."""
    client = clients.multi()
    first_request = request(["a-full"], limit=10)
    first = await client.multi_list(first_request, headers=fleet.auth("alice"))
    binding = cursor_binding(
        first_request.selection, Query.from_message(first_request.query), MultiListRequest.ORDER_FAIR
    )
    content = TokenSealer(derive_token_key(TOKEN_KEY.encode())).open(
        CURSOR, first.next_cursor, "alice", binding
    )

    def sealed_with(secret: str) -> str:
        return TokenSealer(derive_token_key(secret.encode())).seal(CURSOR, "alice", binding, content)

    async def page(cursor: str) -> MultiListResponse:
        message = request(["a-full"], limit=10)
        message.cursor = cursor
        return await client.multi_list(message, headers=fleet.auth("alice"))

    current = await page(first.next_cursor)
    previous = await page(sealed_with(PREVIOUS_TOKEN_KEY))
    assert items([current]) == items([previous])
    assert len(items([current])) == 10
    assert not set(items([current])) & set(items([first]))
    messages = set()
    for cursor in (sealed_with(RETIRED_TOKEN_KEY), first.next_cursor[:-4] + "AAAA"):
        with pytest.raises(ConnectError) as caught:
            await page(cursor)
        assert caught.value.code is Code.INVALID_ARGUMENT
        messages.add(caught.value.message)
    assert len(messages) == 1, messages


@pytest.mark.security
async def test_hostile_requests_are_refused_precisely(fleet: Fleet, clients: Clients) -> None:
    client = clients.multi()
    cases = {
        "oversized selection": request([f"c{i}" for i in range(8)]),
        "huge names": request(["x" * 100_000]),
        "no resource": MultiListRequest(query=ResourceQuery(version="v1")),
        "negative limit": request(["a-full"], limit=-1),
        "huge limit": request(["a-full"], limit=10**9),
        "bad label selector": request(label_selector="env in ("),
        "huge selector": request(
            ["a-full"], query=ResourceQuery(version="v1", resource="configmaps", label_selector="a" * 70_000)
        ),
        "bad timeout": request(["a-full"], timeout=-1),
    }
    for what, message in cases.items():
        with pytest.raises(ConnectError) as caught:
            await client.multi_list(message, headers=fleet.auth("alice"))
        assert caught.value.code is Code.INVALID_ARGUMENT, (what, caught.value)
        assert len(caught.value.message) < 400, what
    with pytest.raises(ConnectError) as caught:
        await client.multi_list(request(["a-full"]), headers={"authorization": "Bearer nope"})
    assert caught.value.code is Code.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("transport", "json"),
    [
        ("connect-h1", False),
        ("connect-h1", True),
        ("connect-h2c", False),
        ("connect-h2c", True),
        ("grpc-h2c", False),
        ("grpcweb-h1", False),
    ],
)
async def test_every_protocol_and_codec_returns_the_same_content(
    fleet: Fleet, clients: Clients, transport: str, json: bool
) -> None:
    """4.2.9: Connect (binary and JSON), gRPC and gRPC-Web: the same items and statuses."""
    client = clients.multi(transport, json=json)
    pages = await traverse(client, request(["a-full", "c-none", "f-nocrd"], limit=120), fleet.auth("alice"))
    found = items(pages)
    assert max(found.values()) == 1
    assert of_cluster(found, "a-full") == fleet.truth("a-full")
    assert of_cluster(found, "f-nocrd") == fleet.truth("f-nocrd")
    outcomes = {name: s.outcome for name, s in final_statuses(pages).items()}
    assert outcomes == {"a-full": OK, "c-none": Outcome.OUTCOME_FORBIDDEN, "f-nocrd": OK}


async def test_in_flight_legs_per_cluster_are_capped(fleet: Fleet, clients: Clients) -> None:
    """4.2.8: two users scanning the same cluster with many calls at once: never more than
    fanout.max_inflight_per_cluster (2 here) legs in flight to it; the others waited their turn."""
    waits = fleet.hub_metric("otterscale_hub_fanout_list_leg_waits_total", cluster="a-full")
    client = clients.multi()

    async def scan(user: str) -> None:
        pages = await traverse(client, request(["a-full"], limit=100), fleet.auth(user))
        assert of_cluster(items(pages), "a-full") == fleet.truth("a-full", user=user)

    await asyncio.gather(*(scan(user) for user in ("alice", "bob") * 4))
    assert fleet.hub_metric("otterscale_hub_fanout_list_legs_inflight_peak", cluster="a-full") == 2
    assert fleet.hub_metric("otterscale_hub_fanout_list_leg_waits_total", cluster="a-full") > waits
