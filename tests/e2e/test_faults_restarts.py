"""kube-apiserver restarted under an agent, the hub restarted under open Watches.

In both, a writer keeps creating and updating ConfigMaps straight in kube-apiserver (as admin),
clients hold Watches through the hub that resume from their last resourceVersion whenever a
stream ends, and at the end the events each client saw (deduplicated by resourceVersion) must be
exactly the writes, and the writes exactly the objects in the cluster.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import System

from .conftest import Hub, Measurements, unique
from .test_faults import (
    ResumingWatch,
    Writer,
    assert_clean_error,
    assert_cluster_holds_what_was_written,
    assert_saw_exactly_what_was_written,
    call_code,
    list_configmaps,
    until,
    watch_writer,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.faults,
    pytest.mark.skipif(
        "config.getoption('--provider') == 'kind'",
        reason="local provider only (--provider=kind): restarts local OS processes",
    ),
]

#: A call while kube-apiserver is down must fail within this many seconds (connection refused).
APISERVER_DOWN_FAILS_WITHIN = 5.0


async def test_kube_apiserver_restarted_under_an_agent(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    """While kube-apiserver is down, calls through the hub fail unavailable with a clean message
    and an open Watch ends unavailable; once it is back, calls work and the Watch, resumed from its
    last resourceVersion, misses nothing written before or after."""
    system = otterscale_system
    cp = system.clusters["west"].control_plane
    assert cp is not None
    auth = hub.auth("bob")
    client = hub.client("connect-h2c")
    writer = Writer(cp, namespace, unique("apiserver"))
    watch_client = hub.client("grpc-h2c", timeout_ms=None)
    listing = list_configmaps("west", namespace, writer.selector)
    start = await watch_client.list(listing, headers=auth)

    async def relist() -> pb.ListResponse:
        listed: pb.ListResponse = await watch_client.list(listing, headers=auth)
        return listed

    watch = watch_writer(watch_client, auth, "west", namespace, writer, start.resource_version, relist=relist)
    task = asyncio.create_task(watch.run(), name="resuming-watch")
    writer.start()
    stopped = False
    try:
        await until(lambda: writer.count >= 6 and watch.check_caught_up(writer), 20, "first writes seen")
        writer.pause()
        before = writer.count
        down = time.monotonic()
        cp.stop_apiserver()
        stopped = True
        stop_took = time.monotonic() - down

        await until(lambda: bool(watch.endings_since(down)), 10, "the open watch ending")
        ended = watch.endings_since(down)[0]
        # Unavailable (the client resumes), no stack trace, and where to resume from, as when
        # kube-apiserver ends a watch in an orderly way.
        assert ended.code is Code.UNAVAILABLE, ended
        assert "Traceback" not in ended.message, ended
        assert "resume from resourceVersion" in ended.message, ended

        started = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            await client.list(list_configmaps("west", namespace), headers=auth)
        failed_in = time.monotonic() - started
        assert_clean_error(caught.value)
        assert failed_in < APISERVER_DOWN_FAILS_WITHIN
        for call in (
            client.get(
                pb.GetRequest(
                    cluster="west", version="v1", resource="configmaps", namespace=namespace, name="x"
                ),
                headers=auth,
            ),
            client.delete(
                pb.DeleteRequest(
                    cluster="west", version="v1", resource="configmaps", namespace=namespace, name="x"
                ),
                headers=auth,
            ),
        ):
            with pytest.raises(ConnectError) as other:
                await call
            assert_clean_error(other.value)
        # The agent and its tunnel are fine: the cluster stays connected in the hub's view.
        assert system.connected()["west"] is True

        restarted = time.monotonic()
        cp.start_apiserver(wait=False)
        stopped = False

        async def ready() -> bool:
            return await asyncio.to_thread(cp.apiserver_ready)

        await until(ready, 120, "kube-apiserver ready again", every=0.2)
        apiserver_ready = time.monotonic() - restarted

        async def works() -> bool:
            return await call_code(client.list(list_configmaps("west", namespace), headers=auth)) is None

        await until(works, 30, "calls through the hub working again")
        calls_back = time.monotonic() - restarted
        writer.resume()
        await until(lambda: writer.count >= before + 6, 20, "writes after the restart")
        writer.stop()
        await until(lambda: watch.check_caught_up(writer), 30, "the resumed watch catching up")
    finally:
        writer.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if stopped:
            cp.start_apiserver()
    written_before = writer.written[:before]
    check_resumed_across_an_apiserver_restart(watch, writer, written_before)
    expired = [dict(e.status) for e in watch.events if e.type == pb.WatchEvent.TYPE_ERROR]
    measurements.record(
        "kube_apiserver_restart",
        {
            "apiserver_stop_s": round(stop_took, 3),
            "watch_ended_after_s": round(ended.at - down, 3),
            "watch_ended_with": f"{ended.code}: {ended.message}",
            "call_failed_in_s": round(failed_in, 3),
            "call_error": f"{caught.value.code}: {caught.value.message}",
            "apiserver_start_to_ready_s": round(apiserver_ready, 3),
            "apiserver_start_to_calls_working_s": round(calls_back, 3),
            "watch_attempts": watch.attempts,
            "resume_refused": [f"{e.get('code')} {e.get('reason')}: {e.get('message')}" for e in expired],
            "relists": len(watch.relists),
            "writes": writer.count,
        },
    )


def check_resumed_across_an_apiserver_restart(
    watch: ResumingWatch, writer: Writer, written_before: list[tuple[str, str]]
) -> None:
    """What a client that resumes (and relists when kube-apiserver refuses the old version, 410)
    knows equals the cluster: every write before the restart and after its relist came as one
    event, and its view of every object is the last written version, which the cluster holds."""
    if not watch.relists:
        assert_saw_exactly_what_was_written(watch, writer)
        return
    seen = watch.changes()
    assert len(seen) == len(set(seen)), f"events seen twice: {sorted({c for c in seen if seen.count(c) > 1})}"
    assert set(written_before) <= set(seen), "writes before the restart the watch never saw"
    (_, _, listed_at), *_ = watch.relists[-1:]
    # resourceVersions are opaque to clients; comparing them as numbers is fine in a test (etcd).
    after = [(n, rv) for n, rv in writer.written if int(rv) > int(listed_at)]
    assert set(after) <= set(seen), f"writes after the relist the watch never saw: {set(after) - set(seen)}"
    assert watch.view == writer.last_versions()
    assert_cluster_holds_what_was_written(writer)


async def test_watches_survive_a_hub_restart_without_missing_a_write(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    """Clients of every protocol hold Watches while the hub restarts: the streams end unavailable,
    the clients resume from their resourceVersion once it is back, and every write made straight in
    kube-apiserver throughout (also while the hub was away) is seen exactly once."""
    system = otterscale_system
    cp = system.clusters["east"].control_plane
    assert cp is not None
    auth = hub.auth("alice")
    writer = Writer(cp, namespace, unique("hubrestart"))
    start = await hub.client("connect-h2c").list(
        list_configmaps("east", namespace, writer.selector), headers=auth
    )
    transports = ("connect-h1", "grpc-h2c", "grpcweb-h1")
    watches = {
        t: watch_writer(
            hub.client(t, timeout_ms=None), auth, "east", namespace, writer, start.resource_version
        )
        for t in transports
    }
    tasks = [asyncio.create_task(w.run(), name=f"resuming-watch-{t}") for t, w in watches.items()]
    writer.start()
    try:

        async def all_caught_up() -> bool:
            return all(w.check_caught_up(writer) for w in watches.values())

        await until(lambda: writer.count >= 6, 20, "first writes")
        await until(all_caught_up, 20, "first writes seen by every watch")
        stopped = time.monotonic()
        system.stop_hub()
        before_start = writer.count
        # The writer goes on while the hub is away; the hub stays away until it has written.
        await until(lambda: writer.count >= before_start + 6, 20, "writes while the hub is away")
        written_while_away = writer.count - before_start
        for transport, w in watches.items():
            first = w.endings_since(stopped)
            assert first, f"{transport}: the watch did not end with the hub"
            assert first[0].code is Code.UNAVAILABLE, (transport, first[0])
        spawned = time.monotonic()
        system.start_hub()
        for name in ("east", "west"):
            system.wait_connected(name)
        back = time.monotonic() - spawned
        await until(all_caught_up, 30, "every resumed watch catching up")
        caught_up = time.monotonic() - spawned
        await until(lambda: writer.count >= before_start + written_while_away + 6, 20, "writes after")
        writer.stop()
        await until(all_caught_up, 20, "the last writes seen by every watch")
    finally:
        writer.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if system.hub is None:
            system.start_hub()
            for name in ("east", "west"):
                system.wait_connected(name)
    for watch in watches.values():
        assert_saw_exactly_what_was_written(watch, writer)
    measurements.record(
        "watches_across_hub_restart",
        {
            "writes": writer.count,
            "writes_while_hub_away": written_while_away,
            "hub_spawn_to_agents_connected_s": round(back, 3),
            "hub_spawn_to_watches_caught_up_s": round(caught_up, 3),
            "attempts": {t: w.attempts for t, w in watches.items()},
        },
    )
