"""MultiWatch through the real hub, agents, tunnels and control planes (fanout.md 4.2, 10-16).

Each test watches objects of its own (a fresh name), writes numbered changes to them in several
clusters, and checks, per cluster, that the stream carries exactly that sequence: in order, none
missing, none twice (except what a resume may repeat after its checkpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf.duration_pb2 import Duration

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.multicluster_connect import MultiClusterServiceClient
from otterscale.resource.v1.multicluster_pb2 import (
    ClusterResourceVersion,
    ClusterSelection,
    ClusterStatus,
    FanoutOptions,
    MultiListRequest,
    MultiWatchRequest,
    MultiWatchResponse,
    ResourceQuery,
)
from otterscale.testing import ControlPlane, KubeAPIError

from .conftest import Clients, Fleet, wait_connected

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

Outcome = ClusterStatus.Outcome
NAMESPACE = "team-e"
#: How long a test waits for something the stream must deliver (generous: a loaded 2-core box).
WAIT = 60.0


@dataclass
class Collector:
    """Reads a MultiWatch stream in a task and keeps everything, in arrival order."""

    messages: list[MultiWatchResponse] = field(default_factory=list)
    error: BaseException | None = None
    ended: bool = False
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None

    async def run(self, stream: AsyncIterator[MultiWatchResponse]) -> None:
        try:
            async for message in stream:
                async with self._changed:
                    self.messages.append(message)
                    self._changed.notify_all()
        except ConnectError as exc:
            self.error = exc
        finally:
            self.ended = True
            async with self._changed:
                self._changed.notify_all()

    async def wait(self, what: str, check: Callable[[], bool], within: float = WAIT) -> None:
        """Until ``check()`` holds (re-checked at every message), or fail saying ``what``."""
        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: check() or self.ended)
        except TimeoutError:
            raise AssertionError(f"{what}: not within {within:g}s; statuses {self.status_names()}") from None
        if not check():
            raise AssertionError(f"{what}: the stream ended ({self.error}); statuses {self.status_names()}")

    def events(self, cluster: str, kind: int | None = None) -> list[pb.WatchEvent]:
        return [
            m.event.event
            for m in self.messages
            if m.HasField("event")
            and m.event.cluster == cluster
            and (kind is None or m.event.event.type == kind)
        ]

    def numbers(self, cluster: str) -> list[int]:
        """``data.n`` of the cluster's MODIFIED events, in order."""
        found = []
        for event in self.events(cluster, pb.WatchEvent.TYPE_MODIFIED):
            data = event.resource.object.fields["data"].struct_value.fields
            found.append(int(data["n"].string_value))
        return found

    def statuses(self, cluster: str) -> list[int]:
        return [
            m.status.outcome for m in self.messages if m.HasField("status") and m.status.cluster == cluster
        ]

    def status_names(self) -> dict[str, list[str]]:
        names: dict[str, list[str]] = {}
        for m in self.messages:
            if m.HasField("status"):
                names.setdefault(m.status.cluster, []).append(Outcome.Name(m.status.outcome))
        return names

    def checkpoints(self) -> list[str]:
        return [m.checkpoint.resume for m in self.messages if m.HasField("checkpoint")]

    def last_rv(self, cluster: str) -> str:
        """The resourceVersion of the cluster's last event (what a client tracks itself)."""
        events = self.events(cluster)
        return events[-1].resource_version if events else ""


@contextlib.asynccontextmanager
async def watching(
    client: MultiClusterServiceClient, message: MultiWatchRequest, headers: dict[str, str]
) -> AsyncIterator[Collector]:
    collector = Collector()
    stream = client.multi_watch(message, headers=headers)
    collector.task = asyncio.create_task(collector.run(stream), name="test-multiwatch-reader")
    try:
        yield collector
    finally:
        collector.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectError):
            await collector.task
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def refusal(
    client: MultiClusterServiceClient, message: MultiWatchRequest, headers: dict[str, str]
) -> ConnectError:
    """The error a stream that must be refused ends with."""
    async with watching(client, message, headers) as stream:
        await stream.wait("refused", lambda: stream.ended)
    assert isinstance(stream.error, ConnectError), f"not refused: {stream.status_names()}"
    return stream.error


def watch_request(
    name: str,
    clusters: Sequence[str],
    *,
    initial: int = MultiWatchRequest.INITIAL_EVENTS_MISSING_ONLY,
    resume: str = "",
    resume_from: dict[str, str] | None = None,
    checkpoint_interval: float = 0,
) -> MultiWatchRequest:
    message = MultiWatchRequest(
        selection=ClusterSelection(clusters=list(clusters)),
        query=query(name),
        initial_events=initial,  # type: ignore[arg-type]
        resume=resume,
        resume_from=[
            ClusterResourceVersion(cluster=c, resource_version=rv) for c, rv in (resume_from or {}).items()
        ],
        options=FanoutOptions(),
    )
    if checkpoint_interval:
        message.checkpoint_interval.CopyFrom(Duration(seconds=int(checkpoint_interval)))
    return message


def query(name: str) -> ResourceQuery:
    return ResourceQuery(
        version="v1", resource="configmaps", namespace=NAMESPACE, field_selector=f"metadata.name={name}"
    )


def create(cp: ControlPlane, name: str) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {"n": "0"},
    }
    cp.request("POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps", body)


async def write(cp: ControlPlane, name: str, n: int) -> None:
    """Change the object's ``data.n`` to ``n`` (as admin, off the event loop)."""

    def patch() -> Any:
        return cp.request(
            "PATCH",
            f"/api/v1/namespaces/{NAMESPACE}/configmaps/{name}",
            {"data": {"n": str(n)}},
            content_type="application/merge-patch+json",
        )

    await asyncio.to_thread(patch)


def fresh(fleet: Fleet, clusters: Sequence[str]) -> str:
    """A new object name, created in every (distinct) control plane of ``clusters``."""
    name = f"w-{uuid.uuid4().hex[:8]}"
    for cp in {id(fleet.plane(c)): fleet.plane(c) for c in clusters}.values():
        create(cp, name)
    return name


async def test_each_cluster_streams_its_own_changes_in_order(fleet: Fleet, clients: Clients) -> None:
    """4.2.10: per cluster exactly the written sequence; FORBIDDEN and UNAVAILABLE legs reported
    and the others unaffected; initial state first, then SYNCED."""
    name = fresh(fleet, ["a-full", "f-nocrd"])
    client = clients.multi(timeout_ms=None)
    message = watch_request(name, ["a-full", "c-none", "d-down", "f-nocrd"])
    request_id = f"fanout-watch-{uuid.uuid4().hex[:8]}"
    async with watching(client, message, fleet.auth("alice", **{"x-request-id": request_id})) as stream:
        await stream.wait(
            "SYNCED on a-full and f-nocrd",
            lambda: Outcome.OUTCOME_SYNCED in stream.statuses("a-full")
            and Outcome.OUTCOME_SYNCED in stream.statuses("f-nocrd"),
        )
        for cluster in ("a-full", "f-nocrd"):
            added = stream.events(cluster, pb.WatchEvent.TYPE_ADDED)
            assert [
                e.resource.object.fields["metadata"].struct_value.fields["name"].string_value for e in added
            ] == [name]
        await stream.wait("c-none FORBIDDEN", lambda: Outcome.OUTCOME_FORBIDDEN in stream.statuses("c-none"))
        assert stream.statuses("d-down") == [Outcome.OUTCOME_UNAVAILABLE]
        for n in range(1, 21):
            await asyncio.gather(
                write(fleet.plane("a-full"), name, n), write(fleet.plane("f-nocrd"), name, n)
            )
        await stream.wait(
            "20 changes per cluster",
            lambda: len(stream.numbers("a-full")) >= 20 and len(stream.numbers("f-nocrd")) >= 20,
        )
        assert stream.numbers("a-full") == list(range(1, 21))
        assert stream.numbers("f-nocrd") == list(range(1, 21))
        assert stream.statuses("a-full") == [Outcome.OUTCOME_CONNECTING, Outcome.OUTCOME_SYNCED]
        delivered = {cluster: len(stream.events(cluster)) for cluster in ("a-full", "f-nocrd")}
    # The stream's one audit event, written when the hub has wound it down: each cluster's last
    # state and the events its leg read (at least those delivered: the client left mid-stream).
    event = await fleet.audit_event(request_id)
    assert (event["verb"], event["resource"], event["code"]) == ("MultiWatch", "configmaps", "canceled")
    assert {name: c["outcome"] for name, c in event["clusters"].items()} == {
        "a-full": "synced",
        "c-none": "forbidden",
        "d-down": "unavailable",
        "f-nocrd": "synced",
    }
    for cluster, count in delivered.items():
        assert event["clusters"][cluster]["items"] >= count >= 21


async def test_json_clients_get_the_same_stream(fleet: Fleet, clients: Clients) -> None:
    name = fresh(fleet, ["a-full"])
    async with watching(
        clients.multi(json=True, timeout_ms=None), watch_request(name, ["a-full"]), fleet.auth("alice")
    ) as stream:
        await stream.wait("SYNCED", lambda: Outcome.OUTCOME_SYNCED in stream.statuses("a-full"))
        for n in range(1, 6):
            await write(fleet.plane("a-full"), name, n)
        await stream.wait("5 changes", lambda: len(stream.numbers("a-full")) >= 5)
        assert stream.numbers("a-full") == [1, 2, 3, 4, 5]


async def test_a_killed_agent_costs_its_cluster_nothing_and_the_others_nothing(
    fleet: Fleet, clients: Clients
) -> None:
    """4.2.11: f-nocrd's agent is SIGKILLed mid-stream: UNAVAILABLE for f-nocrd only, a-full keeps
    streaming meanwhile; once the agent is back, every change made during the outage arrives, in
    order, nothing twice."""
    name = fresh(fleet, ["a-full", "f-nocrd"])
    system = fleet.system
    async with watching(
        clients.multi(timeout_ms=None), watch_request(name, ["a-full", "f-nocrd"]), fleet.auth("alice")
    ) as stream:
        await stream.wait(
            "both SYNCED",
            lambda: all(Outcome.OUTCOME_SYNCED in stream.statuses(c) for c in ("a-full", "f-nocrd")),
        )
        await asyncio.gather(write(fleet.plane("a-full"), name, 1), write(fleet.plane("f-nocrd"), name, 1))
        await stream.wait(
            "change 1", lambda: stream.numbers("a-full") == [1] and stream.numbers("f-nocrd") == [1]
        )
        try:
            system.kill_agent("f-nocrd")  # blocks the loop a moment: spawning is main-thread only
            await stream.wait(
                "f-nocrd UNAVAILABLE", lambda: Outcome.OUTCOME_UNAVAILABLE in stream.statuses("f-nocrd")
            )
            for n in range(2, 8):
                await asyncio.gather(
                    write(fleet.plane("a-full"), name, n), write(fleet.plane("f-nocrd"), name, n)
                )
            await stream.wait("a-full streams on", lambda: len(stream.numbers("a-full")) >= 7)
            assert stream.numbers("f-nocrd") == [1]
        finally:
            system.start_agent("f-nocrd")
        await stream.wait("f-nocrd catches up", lambda: len(stream.numbers("f-nocrd")) >= 7)
        assert stream.numbers("f-nocrd") == list(range(1, 8))
        assert stream.numbers("a-full") == list(range(1, 8))
        assert stream.statuses("a-full") == [Outcome.OUTCOME_CONNECTING, Outcome.OUTCOME_SYNCED]
        after = stream.statuses("f-nocrd")[stream.statuses("f-nocrd").index(Outcome.OUTCOME_UNAVAILABLE) :]
        assert after[-1] == Outcome.OUTCOME_SYNCED, stream.status_names()


async def test_a_410_resyncs_only_that_cluster(fleet: Fleet, clients: Clients) -> None:
    """4.2.12: f-nocrd resumes from a resourceVersion long gone: RESYNC_START, its current objects
    as ADDED, RESYNC_END, then changes; a-full resumes normally and is not re-listed."""
    name = fresh(fleet, ["a-full", "f-nocrd"])
    # Compaction alone is not enough: kube-apiserver answers old watches from its watch cache; a
    # restarted one starts its cache now, so anything older is 410 Gone (as after any restart).
    cp = fleet.plane("f-nocrd")
    cp.compact()
    cp.restart_apiserver()  # main thread: see otterscale.testing._system
    await wait_connected(fleet, "f-nocrd")
    listed = fleet.plane("a-full").request(
        "GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps?fieldSelector=metadata.name={name}"
    )
    message = watch_request(
        name,
        ["a-full", "f-nocrd"],
        resume_from={"f-nocrd": "1", "a-full": listed["metadata"]["resourceVersion"]},
    )
    async with watching(clients.multi(timeout_ms=None), message, fleet.auth("alice")) as stream:
        await stream.wait(
            "f-nocrd RESYNC_END", lambda: Outcome.OUTCOME_RESYNC_END in stream.statuses("f-nocrd")
        )
        statuses = stream.statuses("f-nocrd")
        assert statuses[-2:] == [Outcome.OUTCOME_RESYNC_START, Outcome.OUTCOME_RESYNC_END], (
            stream.status_names()
        )
        # Between the markers: the cluster's current state for the query, as ADDED events.
        order = [
            (m.status.outcome if m.HasField("status") else m.event.event.type)
            for m in stream.messages
            if (m.HasField("status") and m.status.cluster == "f-nocrd")
            or (m.HasField("event") and m.event.cluster == "f-nocrd")
        ]
        start, end = order.index(Outcome.OUTCOME_RESYNC_START), order.index(Outcome.OUTCOME_RESYNC_END)
        between = order[start + 1 : end]
        assert between.count(pb.WatchEvent.TYPE_ADDED) == 1
        assert set(between) <= {pb.WatchEvent.TYPE_ADDED, pb.WatchEvent.TYPE_BOOKMARK}
        await stream.wait("a-full SYNCED", lambda: Outcome.OUTCOME_SYNCED in stream.statuses("a-full"))
        assert Outcome.OUTCOME_RESYNC_START not in stream.statuses("a-full")
        assert not stream.events("a-full", pb.WatchEvent.TYPE_ADDED)  # resumed, not re-listed
        await asyncio.gather(write(fleet.plane("a-full"), name, 1), write(fleet.plane("f-nocrd"), name, 1))
        await stream.wait(
            "changes after the resync",
            lambda: stream.numbers("a-full") == [1] and stream.numbers("f-nocrd") == [1],
        )


async def test_resuming_from_a_checkpoint_or_tracked_versions_loses_nothing(
    fleet: Fleet, clients: Clients
) -> None:
    """4.2.13: end the stream, write more, resume from the last checkpoint and from the
    resourceVersions the client tracked: every later change arrives, in order."""
    name = fresh(fleet, ["a-full", "f-nocrd"])
    client = clients.multi(timeout_ms=None)
    clusters = ["a-full", "f-nocrd"]
    async with watching(
        client, watch_request(name, clusters, checkpoint_interval=1), fleet.auth("alice")
    ) as stream:
        await stream.wait(
            "both SYNCED", lambda: all(Outcome.OUTCOME_SYNCED in stream.statuses(c) for c in clusters)
        )
        for n in range(1, 4):
            await asyncio.gather(*(write(fleet.plane(c), name, n) for c in clusters))
        await stream.wait("3 changes", lambda: all(len(stream.numbers(c)) >= 3 for c in clusters))
        seen = len(stream.checkpoints())
        await stream.wait("a checkpoint after them", lambda: len(stream.checkpoints()) > seen)
        checkpoint = stream.checkpoints()[-1]
        tracked = {c: stream.last_rv(c) for c in clusters}
    for n in range(4, 9):
        await asyncio.gather(*(write(fleet.plane(c), name, n) for c in clusters))
    for resumed in (
        watch_request(name, clusters, resume=checkpoint),
        watch_request(name, clusters, resume_from=tracked),
    ):
        async with watching(client, resumed, fleet.auth("alice")) as stream:
            await stream.wait(
                "the 5 later changes", lambda: all(stream.numbers(c)[-1:] == [8] for c in clusters)
            )
            for cluster in clusters:
                assert stream.numbers(cluster) == list(range(4, 9)), cluster
                assert not stream.events(cluster, pb.WatchEvent.TYPE_ADDED)
    # Another caller cannot use alice's checkpoint.
    error = await refusal(client, watch_request(name, clusters, resume=checkpoint), fleet.auth("bob"))
    assert error.code is Code.INVALID_ARGUMENT


async def test_list_then_watch_the_fleet(fleet: Fleet, clients: Clients) -> None:
    """MultiList's resume token continues every cluster from exactly its snapshot."""
    name = fresh(fleet, ["a-full", "f-nocrd"])
    client = clients.multi(timeout_ms=None)
    listing = MultiListRequest(selection=ClusterSelection(clusters=["a-full", "f-nocrd"]), query=query(name))
    page = await client.multi_list(listing, headers=fleet.auth("alice"))
    assert not page.next_cursor
    assert page.resume
    assert sum(len(part.list.items) for part in page.lists) == 2
    for n in (1, 2):
        await asyncio.gather(write(fleet.plane("a-full"), name, n), write(fleet.plane("f-nocrd"), name, n))
    message = watch_request(name, ["a-full", "f-nocrd"], resume=page.resume)
    async with watching(client, message, fleet.auth("alice")) as stream:
        await stream.wait(
            "both changes", lambda: all(len(stream.numbers(c)) >= 2 for c in ("a-full", "f-nocrd"))
        )
        assert stream.numbers("a-full") == [1, 2]
        assert stream.numbers("f-nocrd") == [1, 2]
        assert not stream.events("a-full", pb.WatchEvent.TYPE_ADDED)


async def test_no_new_leg_with_an_expired_token(fleet: Fleet, clients: Clients) -> None:
    """4.2.16: legs that stay up outlive the token; the first one that must reconnect after the
    token's expiry ends the stream with unauthenticated instead of dialling with it."""
    name = fresh(fleet, ["a-full", "f-nocrd"])
    lifetime = 10.0
    token = fleet.token("alice", lifetime=lifetime)
    expires = time.time() + lifetime
    headers = {"authorization": f"Bearer {token}"}
    system = fleet.system
    async with watching(
        clients.multi(timeout_ms=None), watch_request(name, ["a-full", "f-nocrd"]), headers
    ) as stream:
        await stream.wait(
            "both SYNCED",
            lambda: all(Outcome.OUTCOME_SYNCED in stream.statuses(c) for c in ("a-full", "f-nocrd")),
        )
        await asyncio.sleep(max(0.0, expires - time.time()) + 1)  # the token's own deadline
        await write(fleet.plane("a-full"), name, 1)
        await stream.wait("a-full streams past the expiry", lambda: stream.numbers("a-full") == [1])
        try:
            system.kill_agent("f-nocrd")  # blocks the loop a moment: spawning is main-thread only
            await stream.wait("the stream ends", lambda: stream.ended)
        finally:
            system.start_agent("f-nocrd")
    assert isinstance(stream.error, ConnectError), stream.error
    assert stream.error.code is Code.UNAUTHENTICATED, stream.error


async def test_legs_count_against_the_callers_limit(fleet: Fleet, clients: Clients) -> None:
    """fanout.max_legs_per_subject (12 here): alice's 7-cluster stream holds 7 legs, so a
    MultiList wanting 6 more at once is refused naming the key; bob is not affected."""
    name = fresh(fleet, ["a-full"])
    client = clients.multi(timeout_ms=None)
    message = watch_request(name, [], initial=MultiWatchRequest.INITIAL_EVENTS_NONE)
    async with watching(client, message, fleet.auth("alice")) as stream:
        await stream.wait("a-full SYNCED", lambda: Outcome.OUTCOME_SYNCED in stream.statuses("a-full"))
        listing = MultiListRequest(
            selection=ClusterSelection(clusters=["a-full", "b-ns", "c-none", "e-slow", "f-nocrd", "g-hole"]),
            query=ResourceQuery(version="v1", resource="configmaps", namespace="team-a"),
            limit=600,  # 100 items a leg: all six clusters in one page
        )
        refusals = fleet.hub_metric("otterscale_hub_limit_refusals_total", reason="fanout_legs_per_subject")
        with pytest.raises(ConnectError) as caught:
            await client.multi_list(listing, headers=fleet.auth("alice"))
        assert caught.value.code is Code.RESOURCE_EXHAUSTED
        assert "fanout.max_legs_per_subject" in caught.value.message
        assert (
            fleet.hub_metric("otterscale_hub_limit_refusals_total", reason="fanout_legs_per_subject")
            == refusals + 1
        )
        bob = MultiListRequest(selection=ClusterSelection(clusters=["a-full"]), query=listing.query)
        assert (await client.multi_list(bob, headers=fleet.auth("bob"))).lists
    # The stream's legs are given back when it ends (the hub notices the client's close first).
    deadline = time.monotonic() + WAIT
    while fleet.hub_metric("otterscale_hub_fanout_watch_legs") > 0:
        assert time.monotonic() < deadline, "the stream's legs were not released"
        await asyncio.sleep(0.1)
    await client.multi_list(listing, headers=fleet.auth("alice"))


async def test_bad_requests_fail_the_call(fleet: Fleet, clients: Clients) -> None:
    client = clients.multi(timeout_ms=None)
    cases = {
        "no resource": MultiWatchRequest(query=ResourceQuery(version="v1")),
        "forged resume": watch_request("x", ["a-full"], resume="mwr1.AAAA"),
        "a cursor as resume": watch_request("x", ["a-full"], resume="mlc1.AAAA"),
        "huge resourceVersion": watch_request("x", ["a-full"], resume_from={"a-full": "9" * 100}),
        "checkpoint too often": MultiWatchRequest(query=query("x"), checkpoint_interval=Duration(nanos=1000)),
    }
    for what, message in cases.items():
        error = await refusal(client, message, fleet.auth("alice"))
        assert error.code is Code.INVALID_ARGUMENT, (what, error)


@pytest.fixture(autouse=True)
async def _agents_back(fleet: Fleet) -> AsyncIterator[None]:
    """Tests that kill an agent start it again; this makes sure it is connected before the next."""
    yield
    for cluster in ("a-full", "f-nocrd"):
        with contextlib.suppress(KubeAPIError):
            await wait_connected(fleet, cluster)
