"""Watch: ordered events with resourceVersions, bookmarks, exact resume, 410 as an ERROR event,
initial events on request, clean client cancel, and (slow) a watch open for over 5 minutes."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane

from .conftest import CLUSTER, ClientFactory

pytestmark = pytest.mark.integration

T = pb.WatchEvent


def _request(namespace: str, **kwargs: Any) -> pb.WatchRequest:
    return pb.WatchRequest(
        cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace, **kwargs
    )


def _summary(event: pb.WatchEvent) -> tuple[int, str, str]:
    name = json_format.MessageToDict(event.resource.object).get("metadata", {}).get("name", "")
    return (event.type, name, event.resource_version)


class Changes:
    """Admin-side writes to ConfigMaps of one namespace."""

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.cp = cp
        self.base = f"/api/v1/namespaces/{namespace}/configmaps"

    def create(self, name: str) -> None:
        self.cp.request(
            "POST", self.base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
        )

    def modify(self, name: str, value: str) -> None:
        self.cp.request(
            "PATCH",
            f"{self.base}/{name}",
            {"data": {"v": value}},
            content_type="application/merge-patch+json",
        )

    def delete(self, name: str) -> None:
        self.cp.request("DELETE", f"{self.base}/{name}")


async def _collect(
    stream: AsyncIterator[pb.WatchEvent], count: int, *, skip_bookmarks: bool = True
) -> list[pb.WatchEvent]:
    events: list[pb.WatchEvent] = []
    async for event in stream:
        if skip_bookmarks and event.type == T.TYPE_BOOKMARK:
            continue
        events.append(event)
        if len(events) == count:
            break
    return events


async def _list_rv(rpc: ResourceServiceClient, namespace: str) -> str:
    listed = await rpc.list(
        pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace)
    )
    return str(listed.resource_version)


async def test_order_and_exact_resume(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client(transport="grpc-h2c")
    changes = Changes(control_plane, namespace)
    rv = await _list_rv(rpc, namespace)

    stream = rpc.watch(_request(namespace, resource_version=rv))
    first = asyncio.create_task(_collect(stream, 3))
    # No wait for the Watch to open: from a listed resourceVersion it gets every later change.
    changes.create("one")
    changes.modify("one", "1")
    changes.create("two")
    seen = await asyncio.wait_for(first, 30)
    await stream.aclose()  # the client cancels; the agent ends its upstream watch
    assert [(e.type, _summary(e)[1]) for e in seen] == [
        (T.TYPE_ADDED, "one"),
        (T.TYPE_MODIFIED, "one"),
        (T.TYPE_ADDED, "two"),
    ]
    versions = [int(e.resource_version) for e in seen]
    assert versions == sorted(versions)
    assert len(set(versions)) == 3

    # Changes made while nobody watches; resuming from the last seen version gets exactly those.
    changes.modify("two", "2")
    changes.delete("one")
    resumed = await asyncio.wait_for(
        _collect(rpc.watch(_request(namespace, resource_version=seen[-1].resource_version)), 2), 30
    )
    assert [(e.type, _summary(e)[1]) for e in resumed] == [(T.TYPE_MODIFIED, "two"), (T.TYPE_DELETED, "one")]
    assert int(resumed[0].resource_version) > versions[-1]


async def test_initial_events_and_bookmark(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client()
    changes = Changes(control_plane, namespace)
    changes.create("existing-a")
    changes.create("existing-b")
    events = await asyncio.wait_for(
        _collect(rpc.watch(_request(namespace, send_initial_events=True)), 3, skip_bookmarks=False), 30
    )
    assert sorted((e.type, _summary(e)[1]) for e in events[:2]) == [
        (T.TYPE_ADDED, "existing-a"),
        (T.TYPE_ADDED, "existing-b"),
    ]
    bookmark = events[2]
    assert bookmark.type == T.TYPE_BOOKMARK
    assert bookmark.resource_version
    metadata = json_format.MessageToDict(bookmark.resource.object)["metadata"]
    assert metadata["annotations"]["k8s.io/initial-events-end"] == "true"
    assert metadata["resourceVersion"] == bookmark.resource_version


async def test_without_initial_events_only_changes_arrive(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client()
    changes = Changes(control_plane, namespace)
    changes.create("before")
    rv = await _list_rv(rpc, namespace)
    stream = rpc.watch(_request(namespace, resource_version=rv))
    task = asyncio.create_task(_collect(stream, 1))
    changes.create("after")  # after the listed resourceVersion: delivered whenever the Watch opens
    events = await asyncio.wait_for(task, 30)
    await stream.aclose()
    assert [_summary(e)[1] for e in events] == ["after"]


def _etcd_url(cp: ControlPlane) -> str:
    etcd = next(p for p in cp.processes if p.name.endswith("/etcd"))
    arg = next(a for a in etcd.argv if a.startswith("--advertise-client-urls="))
    return arg.split("=", 1)[1]


def _compact_etcd(cp: ControlPlane) -> None:
    """Compact etcd to its current revision, as kube-apiserver does every 5 minutes."""
    url = _etcd_url(cp)

    def post(path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")  # noqa: S310
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return json.loads(resp.read())

    revision = post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"]
    post("/v3/kv/compaction", {"revision": revision, "physical": True})


async def test_too_old_resource_version_is_error_event_with_410(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    """Events have no watch cache in kube-apiserver, so their watches read etcd directly: after
    a compaction, any earlier resourceVersion is too old (Kubernetes answers 410 Expired)."""
    rpc = make_client(transport="connect-h2c")
    base = f"/api/v1/namespaces/{namespace}/events"
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "e"},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": namespace},
        "reason": "Test",
        "message": "0",
    }
    control_plane.request("POST", base, event)
    listed = await rpc.list(
        pb.ListRequest(cluster=CLUSTER, version="v1", resource="events", namespace=namespace)
    )
    for i in range(3):
        control_plane.request(
            "PATCH", f"{base}/e", {"message": str(i)}, content_type="application/merge-patch+json"
        )
    _compact_etcd(control_plane)
    request = pb.WatchRequest(
        cluster=CLUSTER,
        version="v1",
        resource="events",
        namespace=namespace,
        resource_version=listed.resource_version,
    )
    events = await asyncio.wait_for(_collect(rpc.watch(request), 1, skip_bookmarks=True), 30)
    assert events[0].type == T.TYPE_ERROR
    status = json_format.MessageToDict(events[0].status)
    assert status["code"] == 410
    assert status["kind"] == "Status"
    assert status["reason"] in ("Expired", "Gone")
    assert "too old" in status["message"]


@pytest.mark.parametrize("resource_version", ["abc", "-1", "\u00ad\u0012"])
async def test_unparseable_resource_version_is_invalid_argument(
    make_client: ClientFactory, namespace: str, resource_version: str
) -> None:
    """kube-apiserver answers such a watch with 500 InternalError (a List gets 400); the client
    made the mistake, so it is invalid_argument with Kubernetes' own message (found by fuzzing)."""
    rpc = make_client(transport="connect-h2c")
    request = pb.WatchRequest(
        cluster=CLUSTER,
        version="v1",
        resource="configmaps",
        namespace=namespace,
        resource_version=resource_version,
    )
    with pytest.raises(ConnectError) as caught:
        await asyncio.wait_for(_collect(rpc.watch(request), 1), 30)
    assert caught.value.code is Code.INVALID_ARGUMENT
    assert caught.value.message.startswith("resourceVersion: Invalid value")


async def test_client_cancel_ends_cleanly(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    """A client that cancels its Watch: the agent ends its upstream watch (kube-apiserver stops
    serving it) and keeps serving."""
    rpc = make_client(transport="connect-h1")
    before = await asyncio.to_thread(control_plane.settled_open_watches, "configmaps")

    async def upstream(count: float) -> None:
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(control_plane.open_watches, "configmaps") != count:
            assert time.monotonic() < deadline, f"kube-apiserver never served {count} namespaced watches"
            await asyncio.sleep(0.05)

    stream = rpc.watch(_request(namespace))
    task = asyncio.create_task(_collect(stream, 1))
    await upstream(before + 1)  # the agent's watch is open at kube-apiserver
    task.cancel()
    # connectrpc's client reports its own cancellation as a CANCELED ConnectError.
    with pytest.raises((asyncio.CancelledError, ConnectError)):
        await task
    await stream.aclose()
    await upstream(before)  # and gone: no leak of open watches
    # The agent keeps serving.
    await _list_rv(rpc, namespace)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_watch_open_longer_than_five_minutes(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client(transport="grpc-h2c")
    changes = Changes(control_plane, namespace)
    rv = await _list_rv(rpc, namespace)
    bookmarks = 0
    seen: list[str] = []

    async def consume() -> None:
        nonlocal bookmarks
        async for event in rpc.watch(_request(namespace, resource_version=rv)):
            if event.type == T.TYPE_BOOKMARK:
                bookmarks += 1
                continue
            seen.append(_summary(event)[1])
            if _summary(event)[1] == "late":
                return

    task = asyncio.create_task(consume())
    started = time.monotonic()
    changes.create("early")
    await asyncio.sleep(310)
    assert not task.done(), "the watch ended before 5 minutes"
    changes.create("late")
    await asyncio.wait_for(task, 60)
    assert seen == ["early", "late"]
    assert time.monotonic() - started > 300
    assert bookmarks >= 1  # periodic bookmarks (about one a minute) were passed through
