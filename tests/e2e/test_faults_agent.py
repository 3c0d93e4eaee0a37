"""An agent SIGKILLed while calls are in flight: a big List, a Watch, writes.

What the client sees is checked (unavailable, never a partial or garbled answer), and so is the
cluster behind it (through the control plane's admin API): a write that answered OK is there,
one that failed can be retried idempotently and ends up exactly once, and a Watch resumed from
its last resourceVersion after the agent is back sees every object written meanwhile, once.
Every test starts the agent again in ``finally``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane, KubeAPIError, System, child_pids

from .conftest import Hub, Measurements, unique
from .test_faults import (
    FAST_FAIL,
    UNAVAILABLE_WITHIN,
    Writer,
    assert_clean_error,
    assert_saw_exactly_what_was_written,
    call_code,
    list_configmaps,
    start_watching_writes,
    until,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.faults,
    pytest.mark.skipif(
        "config.getoption('--provider') == 'kind'",
        reason="local provider only (--provider=kind): SIGKILLs the agent's OS process",
    ),
]

#: ConfigMaps of the big List, and the size of each one's data: a List of ~12 MB that takes the
#: agent a second or more to turn into a response, so it can be killed in the middle.
BIG_LIST_ITEMS = 1500
BIG_LIST_ITEM_BYTES = 8 * 1024
#: Share of the CPU time a whole List costs the agent that it must have spent on the second List
#: before it is killed: proof that the List is under way (the agent is otherwise idle but for
#: pings). CPU, not bytes read: on asyncio's event loop the agent receives with recv_into(),
#: which /proc/<pid>/io's rchar does not count (it counts read(), which uvloop used).
WORK_BEFORE_KILL = 0.25


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` and the processes below it but chisel have used so
    far (the agent's app runs inside Envoy, the command's child)."""
    total = 0.0
    for member in [pid, *child_pids(pid)]:
        try:
            if Path(f"/proc/{member}/comm").read_text().strip() == "chisel":
                continue
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        # After the command: state is field 3 of stat(5); utime and stime are fields 14 and 15.
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def create_many(cp: ControlPlane, namespace: str, count: int, size: int) -> None:
    """``count`` ConfigMaps with ``size`` bytes of random text each, created as admin, 4 at a time.

    Random, so that kube-apiserver's gzip of big responses cannot shrink the List to nothing.
    """

    def one(i: int) -> None:
        payload = base64.b64encode(os.urandom(size * 3 // 4)).decode()
        cp.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/configmaps",
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"big-{i}"},
                "data": {"x": payload},
            },
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(count)))


async def test_an_agent_killed_mid_list_is_unavailable_never_a_partial_answer(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    cp = otterscale_system.clusters["west"].control_plane
    assert cp is not None
    create_many(cp, namespace, BIG_LIST_ITEMS, BIG_LIST_ITEM_BYTES)
    results = {
        transport: await kill_mid_list(hub, otterscale_system, namespace, transport)
        for transport in ("connect-h2c", "grpc-h2c")
    }
    measurements.record("agent_killed_mid_list", results)


async def kill_mid_list(hub: Hub, system: System, namespace: str, transport: str) -> dict[str, Any]:
    """SIGKILL west's agent while it is reading a big List's answer; the client must get unavailable."""
    auth = hub.auth("bob")
    client = hub.client(transport, timeout_ms=120_000)
    agent = system.agents["west"]
    cpu_before = cpu_seconds(agent.pid)
    started = time.monotonic()
    whole = await client.list(list_configmaps("west", namespace), headers=auth)
    full_list_s = time.monotonic() - started
    full_list_cpu = cpu_seconds(agent.pid) - cpu_before
    assert len(whole.items) == BIG_LIST_ITEMS

    cpu_before = cpu_seconds(agent.pid)
    sent = time.monotonic()
    listing = asyncio.create_task(client.list(list_configmaps("west", namespace), headers=auth))

    async def agent_busy() -> bool:
        assert not listing.done(), (
            f"the List ended before the agent could be killed in the middle ({full_list_s:.2f}s "
            f"in full): raise BIG_LIST_ITEMS; result: {listing.exception() or 'ok'}"
        )
        return cpu_seconds(agent.pid) - cpu_before >= WORK_BEFORE_KILL * full_list_cpu

    try:
        await until(agent_busy, 30, "the agent reading the List's answer", every=0.005)
        killed = time.monotonic()
        system.kill_agent("west")
        # Never a partial answer: the call fails (a whole answer would also be acceptable, but the
        # agent was still reading kube-apiserver's, so there is none to send).
        with pytest.raises(ConnectError) as caught:
            await asyncio.wait_for(listing, 30)
        failed_after = time.monotonic() - killed
        assert_clean_error(caught.value)
        assert "west" in caught.value.message
        assert failed_after < UNAVAILABLE_WITHIN
    finally:
        listing.cancel()
        await asyncio.gather(listing, return_exceptions=True)
        if "west" not in system.agents:
            system.start_agent("west")
    back = await client.list(list_configmaps("west", namespace), headers=auth)
    assert {i.object["metadata"]["name"] for i in back.items} == {f"big-{i}" for i in range(BIG_LIST_ITEMS)}
    return {
        "full_list_s": round(full_list_s, 3),
        "killed_after_s": round(killed - sent, 3),
        "unavailable_after_kill_s": round(failed_after, 3),
        "message": caught.value.message,
    }


async def test_a_watch_resumed_after_an_agent_kill_sees_every_write_once(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    """Writes go on straight into kube-apiserver while the agent is dead; the client's Watch ends
    unavailable, resumes from its last resourceVersion once the agent is back, and sees them all."""
    system = otterscale_system
    cp = system.clusters["west"].control_plane
    assert cp is not None
    auth = hub.auth("bob")
    client = hub.client("grpc-h2c", timeout_ms=None)
    writer = Writer(cp, namespace, unique("agentkill"))
    watch, task = await start_watching_writes(client, auth, "west", namespace, writer)
    try:
        before_kill = writer.count
        killed = time.monotonic()
        system.kill_agent("west")
        await until(lambda: bool(watch.endings_since(killed)), UNAVAILABLE_WITHIN, "the watch ending")
        first = watch.endings_since(killed)[0]
        assert first.code is Code.UNAVAILABLE, first
        # The agent stays dead until the writer has written while nobody could watch.
        await until(lambda: writer.count >= before_kill + 6, 20, "writes while the agent is dead")
        written_while_dead = writer.count - before_kill
        restarted = time.monotonic()
        system.start_agent("west")
        await until(lambda: watch.check_caught_up(writer), 30, "the resumed watch catching up")
        caught_up = time.monotonic() - restarted
        writer.stop()
        await until(lambda: watch.check_caught_up(writer), 10, "the last writes seen")
    finally:
        writer.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if "west" not in system.agents:
            system.start_agent("west")
    assert_saw_exactly_what_was_written(watch, writer)
    measurements.record(
        "watch_resumed_after_agent_kill",
        {
            "watch_ended_after_s": round(first.at - killed, 3),
            "writes_while_agent_dead": written_while_dead,
            "writes": writer.count,
            "agent_restart_to_caught_up_s": round(caught_up, 3),
            "attempts": watch.attempts,
        },
    )


def manifest(name: str, namespace: str, value: str) -> bytes:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": {"fault": "writes"}},
            "data": {"v": value},
        }
    ).encode()


def cluster_configmaps(cp: ControlPlane, namespace: str) -> dict[str, str]:
    """name -> data.v of the test's ConfigMaps as kube-apiserver holds them."""
    found = cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps?labelSelector=fault=writes")
    return {item["metadata"]["name"]: item["data"]["v"] for item in found["items"]}


def exists(cp: ControlPlane, namespace: str, name: str) -> bool:
    try:
        cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
    except KubeAPIError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def test_writes_to_a_dead_agent_fail_fast_and_change_nothing(
    hub: Hub, otterscale_system: System, namespace: str
) -> None:
    """Create, Apply and Delete while the agent is dead: unavailable at once, the cluster untouched;
    retried after the agent is back, each takes effect exactly once."""
    system = otterscale_system
    cp = system.clusters["west"].control_plane
    assert cp is not None
    client = hub.client("connect-h2c")
    auth = hub.auth("bob")
    cp.request(
        "POST", f"/api/v1/namespaces/{namespace}/configmaps", json.loads(manifest("doomed", namespace, "0"))
    )

    def create() -> Any:
        return client.create(
            pb.CreateRequest(
                cluster="west",
                version="v1",
                resource="configmaps",
                namespace=namespace,
                manifest=manifest("created", namespace, "c"),
            ),
            headers=auth,
        )

    def apply() -> Any:
        return client.apply(
            pb.ApplyRequest(
                cluster="west",
                version="v1",
                resource="configmaps",
                namespace=namespace,
                name="applied",
                manifest=manifest("applied", namespace, "a"),
                field_manager="faults",
            ),
            headers=auth,
        )

    def delete() -> Any:
        return client.delete(
            pb.DeleteRequest(
                cluster="west", version="v1", resource="configmaps", namespace=namespace, name="doomed"
            ),
            headers=auth,
        )

    system.kill_agent("west")
    try:
        await until(
            lambda: _unavailable(client.list(list_configmaps("west", namespace), headers=auth)),
            UNAVAILABLE_WITHIN,
            "west unavailable",
        )
        for call in (create, apply, delete):
            started = time.monotonic()
            with pytest.raises(ConnectError) as caught:
                await call()
            assert_clean_error(caught.value)
            assert time.monotonic() - started < FAST_FAIL
        assert cluster_configmaps(cp, namespace) == {"doomed": "0"}
    finally:
        if "west" not in system.agents:
            system.start_agent("west")
    # Retried once the agent is back: each takes effect, once.
    assert (await create()).object["metadata"]["name"] == "created"
    assert (await apply()).object["data"]["v"] == "a"
    assert (await apply()).object["data"]["v"] == "a"  # idempotent: the same object, not another
    await delete()
    assert cluster_configmaps(cp, namespace) == {"created": "c", "applied": "a"}


async def _unavailable(call: Any) -> bool:
    return await call_code(call) is Code.UNAVAILABLE


#: Writes issued by each of the concurrent writers of the mid-flight test, and how many must have
#: answered before the agent is killed.
WRITES_PER_WORKER = 40
ANSWERED_BEFORE_KILL = 12


async def test_writes_in_flight_when_the_agent_dies_end_up_exactly_once(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    """Three clients write without pause (Create, Apply, Delete) while the agent is SIGKILLed. Every
    OK is in the cluster at once (a Delete's object gone); every error is retried idempotently once
    the agent is back (Apply again; Create's ALREADY_EXISTS and Delete's NOT_FOUND mean done), and
    the cluster ends with each object exactly once, as last written."""
    system = otterscale_system
    cp = system.clusters["west"].control_plane
    assert cp is not None
    client = hub.client("connect-h2c", timeout_ms=10_000)
    auth = hub.auth("bob")
    for i in range(WRITES_PER_WORKER):
        cp.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/configmaps",
            json.loads(manifest(f"del-{i}", namespace, "0")),
        )

    def request(kind: str, i: int) -> Any:
        if kind == "create":
            return client.create(
                pb.CreateRequest(
                    cluster="west",
                    version="v1",
                    resource="configmaps",
                    namespace=namespace,
                    manifest=manifest(f"create-{i}", namespace, "c"),
                ),
                headers=auth,
            )
        if kind == "apply":
            return client.apply(
                pb.ApplyRequest(
                    cluster="west",
                    version="v1",
                    resource="configmaps",
                    namespace=namespace,
                    name=f"apply-{i}",
                    manifest=manifest(f"apply-{i}", namespace, "a"),
                    field_manager="faults",
                ),
                headers=auth,
            )
        return client.delete(
            pb.DeleteRequest(
                cluster="west", version="v1", resource="configmaps", namespace=namespace, name=f"del-{i}"
            ),
            headers=auth,
        )

    outcomes: dict[tuple[str, int], Code | None] = {}

    async def worker(kind: str) -> None:
        for i in range(WRITES_PER_WORKER):
            try:
                await request(kind, i)
            except ConnectError as exc:
                assert_clean_error(exc)  # unavailable, whatever the moment of the kill
                outcomes[kind, i] = exc.code
            else:
                outcomes[kind, i] = None

    workers = [asyncio.create_task(worker(k), name=f"writer-{k}") for k in ("create", "apply", "delete")]
    try:
        await until(
            lambda: len(outcomes) >= ANSWERED_BEFORE_KILL,
            30,
            "the first writes answered",
            every=0.005,
        )
        system.kill_agent("west")
        await asyncio.wait_for(asyncio.gather(*workers), 60)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if "west" not in system.agents:
            system.start_agent("west")
    ok = [key for key, code in outcomes.items() if code is None]
    failed = [key for key, code in outcomes.items() if code is not None]
    assert ok, "no write answered OK before the kill"
    assert failed, "no write failed: the agent was not killed while they were in flight"
    # An OK is the truth: the object is there (a Delete's is gone), as the call said.
    held = cluster_configmaps(cp, namespace)
    for kind, i in ok:
        if kind == "delete":
            assert f"del-{i}" not in held, f"Delete del-{i} answered OK but the object is still there"
        else:
            assert held.get(f"{kind}-{i}") == kind[0], (
                f"{kind} {kind}-{i} answered OK but is not in the cluster"
            )
    # An error is retried, idempotently: Apply again; Create's ALREADY_EXISTS and Delete's NOT_FOUND
    # (it did happen before the agent died) mean the earlier attempt took effect.
    retried: dict[str, int] = {}
    for kind, i in failed:
        code = await call_code(request(kind, i))
        done = {"create": Code.ALREADY_EXISTS, "delete": Code.NOT_FOUND}.get(kind)
        assert code is None or code is done, f"retrying {kind} {i}: {code}"
        outcome = kind if code is None else f"{kind}_had_happened"
        retried[outcome] = retried.get(outcome, 0) + 1
    held = cluster_configmaps(cp, namespace)
    expected = {f"create-{i}": "c" for i in range(WRITES_PER_WORKER)} | {
        f"apply-{i}": "a" for i in range(WRITES_PER_WORKER)
    }
    # Delete stopped at its first failure in neither worker: every object of each kind is counted.
    answered = {kind: sum(1 for k, _ in outcomes if k == kind) for kind in ("create", "apply", "delete")}
    assert answered == dict.fromkeys(answered, WRITES_PER_WORKER)
    assert held == expected
    measurements.record(
        "writes_in_flight_at_agent_kill",
        {"ok_before_kill_or_during": len(ok), "failed": len(failed), "retried": retried},
    )
