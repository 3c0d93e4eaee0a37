"""MultiWatch's stream logic (pure): fair draining, checkpoints of delivered events only, in-band
resync, per-leg recovery. The hub's door to agents (:class:`AgentLegs`) is replaced by scripted
legs; everything behind it (the real agents, tunnels, kube) is tested in tests/e2e/fanout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from otterscale.common import Identity
from otterscale.hub._access import AccessPolicy
from otterscale.hub._codec import CODEC_PROTO, RawMessage
from otterscale.hub._fanout import wire
from otterscale.hub._fanout.budget import SubjectLegs
from otterscale.hub._fanout.legs import LegFailure
from otterscale.hub._fanout.listing import resume_binding
from otterscale.hub._fanout.query import Query
from otterscale.hub._fanout.selection import ClusterDirectory
from otterscale.hub._fanout.tokens import RESUME, TokenSealer, derive_token_key
from otterscale.hub._fanout.watching import QUANTUM, MultiWatcher, WatchSettings
from otterscale.hub._limits import WatchSlots
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.multicluster_pb2 import (
    ClusterResourceVersion,
    ClusterSelection,
    ClusterStatus,
    MultiWatchRequest,
    MultiWatchResponse,
    ResourceQuery,
)

Outcome = ClusterStatus.Outcome
ALICE = Identity("alice")
QUERY = ResourceQuery(version="v1", resource="configmaps")
END = object()


def event(
    kind: int, rv: str, *, name: str = "cm", end_of_initial: bool = False, code: int = 0, pad: int = 60
) -> bytes:
    message = pb.WatchEvent(type=kind, resource_version=rv)  # type: ignore[arg-type]
    if kind == pb.WatchEvent.TYPE_ERROR:
        message.status.update({"kind": "Status", "code": code, "message": "too old resource version"})
        return message.SerializeToString()
    metadata: dict[str, Any] = {"name": name, "resourceVersion": rv}
    if end_of_initial:
        metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
    message.resource.object.update({"kind": "ConfigMap", "metadata": metadata, "data": {"pad": "x" * pad}})
    return message.SerializeToString()


@dataclass
class ScriptedLegs:
    """Stands in for AgentLegs: each Watch of a cluster plays the next script queued for it."""

    scripts: dict[str, list[asyncio.Queue[object]]] = field(default_factory=dict)
    requests: dict[str, list[pb.WatchRequest]] = field(default_factory=dict)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def script(self, cluster: str, *items: object) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        self.scripts.setdefault(cluster, []).append(queue)
        return queue

    def connected(self, cluster: str) -> bool:
        return True

    async def wait_changed(self) -> None:
        await asyncio.Event().wait()

    async def list(self, cluster: str, identity: Identity, request: RawMessage, **_: Any) -> bytes:
        return pb.ListResponse(resource_version="100").SerializeToString()

    @contextlib.asynccontextmanager
    async def watch(
        self, cluster: str, identity: Identity, request: RawMessage
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        self.requests.setdefault(cluster, []).append(pb.WatchRequest.FromString(request.data))
        self.opened.set()
        queue = self.scripts[cluster].pop(0)

        async def events() -> AsyncIterator[bytes]:
            while True:
                item = await queue.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, bytes)
                yield item

        yield events()


def watcher(legs: ScriptedLegs, clusters: list[str]) -> tuple[MultiWatcher, TokenSealer]:
    labels: dict[str, dict[str, str]] = {name: {} for name in clusters}
    sealer = TokenSealer(derive_token_key(b"k" * 32))
    found = MultiWatcher(
        legs=legs,  # type: ignore[arg-type]
        directory=ClusterDirectory(labels, AccessPolicy(None, labels), max_clusters=100),
        sealer=sealer,
        subject_legs=SubjectLegs(100, 100),
        watch_slots=WatchSlots(10),
        settings=WatchSettings(),
    )
    return found, sealer


def request(clusters: list[str], **kwargs: Any) -> MultiWatchRequest:
    return MultiWatchRequest(selection=ClusterSelection(clusters=clusters), query=QUERY, **kwargs)


async def read(stream: AsyncIterator[bytes], count: int) -> list[MultiWatchResponse]:
    out = []
    async with asyncio.timeout(10):
        while len(out) < count:
            out.append(MultiWatchResponse.FromString(await anext(stream)))
    return out


def kinds(messages: list[MultiWatchResponse], cluster: str) -> list[str]:
    """The cluster's messages in order: status names and event types."""
    out = []
    for m in messages:
        if m.HasField("status") and m.status.cluster == cluster:
            out.append(Outcome.Name(m.status.outcome).removeprefix("OUTCOME_"))
        elif m.HasField("event") and m.event.cluster == cluster:
            out.append(pb.WatchEvent.Type.Name(m.event.event.type).removeprefix("TYPE_"))
    return out


async def test_a_firehose_cluster_cannot_starve_a_quiet_one() -> None:
    legs = ScriptedLegs()
    flood = [event(pb.WatchEvent.TYPE_MODIFIED, str(1000 + i)) for i in range(3000)]
    legs.script("hot", *flood)
    legs.script("quiet", event(pb.WatchEvent.TYPE_MODIFIED, "7", name="quiet-one"))
    found, _ = watcher(legs, ["hot", "quiet"])
    resume = [ClusterResourceVersion(cluster=c, resource_version="5") for c in ("hot", "quiet")]
    stream = found.stream(ALICE, request(["hot", "quiet"], resume_from=resume), CODEC_PROTO, expires=None)
    try:
        seen_hot = 0
        async with asyncio.timeout(10):
            while True:
                message = MultiWatchResponse.FromString(await anext(stream))
                if message.HasField("event") and message.event.cluster == "quiet":
                    break
                if message.HasField("event"):
                    seen_hot += 1
        # Deficit round-robin by bytes: the quiet cluster waited at most about one quantum of the
        # hot one's events (first come, first served would have sent all 3,000 first).
        per_quantum = QUANTUM // len(wire.watch_event(CODEC_PROTO, "hot", flood[0])) + 1
        assert seen_hot <= 2 * per_quantum, seen_hot
    finally:
        await stream.aclose()


async def test_checkpoints_hold_what_was_delivered_not_what_was_read() -> None:
    """Events of ~10 KiB: a deficit round-robin turn delivers one or two, while the leg has long
    read all twenty; a checkpoint due meanwhile names the last event *delivered*."""
    legs = ScriptedLegs()
    legs.script("east", *(event(pb.WatchEvent.TYPE_MODIFIED, str(10 + i), pad=10_000) for i in range(20)))
    found, sealer = watcher(legs, ["east"])
    message = request(
        ["east"],
        resume_from=[ClusterResourceVersion(cluster="east", resource_version="9")],
        checkpoint_interval={"seconds": 1},
    )
    binding = resume_binding(Query.from_message(QUERY))
    stream = found.stream(ALICE, message, CODEC_PROTO, expires=None)
    try:
        delivered = "9"
        checked = 0
        async with asyncio.timeout(20):
            while delivered != "29":
                got = MultiWatchResponse.FromString(await anext(stream))
                if got.HasField("event"):
                    delivered = got.event.event.resource_version
                    if delivered == "13":
                        await asyncio.sleep(1.2)  # a slow client: a checkpoint falls due
                elif got.HasField("checkpoint"):
                    versions = sealer.open(RESUME, got.checkpoint.resume, "alice", binding)["r"]
                    assert versions == {"east": delivered}
                    checked += 1 if delivered not in ("9", "29") else 0
        assert checked >= 1, "no checkpoint fell between two deliveries"
    finally:
        await stream.aclose()


async def test_a_410_resyncs_in_band_and_reconnects_with_initial_events() -> None:
    legs = ScriptedLegs()
    legs.script("east", event(pb.WatchEvent.TYPE_ERROR, "", code=410))
    legs.script(
        "east",
        event(pb.WatchEvent.TYPE_ADDED, "50", name="a"),
        event(pb.WatchEvent.TYPE_ADDED, "51", name="b"),
        event(pb.WatchEvent.TYPE_BOOKMARK, "60", end_of_initial=True),
        event(pb.WatchEvent.TYPE_MODIFIED, "61"),
    )
    found, _ = watcher(legs, ["east"])
    message = request(["east"], resume_from=[ClusterResourceVersion(cluster="east", resource_version="1")])
    stream = found.stream(ALICE, message, CODEC_PROTO, expires=None)
    try:
        got: list[MultiWatchResponse] = []
        while "MODIFIED" not in kinds(got, "east"):
            got += await read(stream, 1)
        assert kinds(got, "east") == [
            "CONNECTING",
            "RESYNC_START",
            "ADDED",
            "ADDED",
            "BOOKMARK",
            "RESYNC_END",
            "MODIFIED",
        ]
        first, second = legs.requests["east"]
        assert (first.resource_version, first.send_initial_events) == ("1", False)
        assert (second.resource_version, second.send_initial_events) == ("", True)
    finally:
        await stream.aclose()


async def test_a_broken_leg_resumes_from_its_last_event_without_disturbing_the_others() -> None:
    legs = ScriptedLegs()
    legs.script(
        "east", event(pb.WatchEvent.TYPE_MODIFIED, "20"), LegFailure(Outcome.OUTCOME_UNAVAILABLE, "cut")
    )
    legs.script("east", event(pb.WatchEvent.TYPE_MODIFIED, "21"))
    legs.script("west", event(pb.WatchEvent.TYPE_MODIFIED, "7"))
    found, _ = watcher(legs, ["east", "west"])
    resume = [ClusterResourceVersion(cluster=c, resource_version="5") for c in ("east", "west")]
    stream = found.stream(ALICE, request(["east", "west"], resume_from=resume), CODEC_PROTO, expires=None)
    try:
        got: list[MultiWatchResponse] = []
        while kinds(got, "east").count("MODIFIED") < 2 or "MODIFIED" not in kinds(got, "west"):
            got += await read(stream, 1)
        # One quiet reconnect from the last event read: no status at all for a live leg that
        # broke and came straight back.
        assert kinds(got, "east") == ["CONNECTING", "SYNCED", "MODIFIED", "MODIFIED"]
        assert kinds(got, "west") == ["CONNECTING", "SYNCED", "MODIFIED"]
        assert [r.resource_version for r in legs.requests["east"]] == ["5", "20"]
        assert len(legs.requests["west"]) == 1
    finally:
        await stream.aclose()
