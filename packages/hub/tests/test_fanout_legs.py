"""Fan-out legs as the agents receive them: client -> hub -> real chisel tunnel -> fake agent.

Every leg of a MultiList page and of a MultiWatch carries the call's request id and the caller's
identity, signed for that cluster and procedure (the fake agents of conftest.py verify the
signature exactly as the real agent does and record the headers they got).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.resource.v1.multicluster_connect import MultiClusterServiceClient
from otterscale.resource.v1.multicluster_pb2 import (
    ClusterSelection,
    ClusterStatus,
    MultiListRequest,
    MultiWatchRequest,
    ResourceQuery,
)

from .conftest import HubEnv, wait_for

pytestmark = pytest.mark.integration

QUERY = ResourceQuery(version="v1", resource="configmaps")
SELECTION = ClusterSelection(clusters=["alpha", "beta"])
#: Generous for a loaded 2-core machine: the MultiWatch legs must reach both agents.
WAIT = 30.0


async def test_every_leg_carries_the_request_id_and_the_signed_caller(hub_env: HubEnv) -> None:
    agents = {name: await hub_env.agent(name) for name in ("alpha", "beta")}
    http = HTTPTransport(http_version=HTTPVersion.HTTP2)
    client = MultiClusterServiceClient(hub_env.hub.url, http_client=Client(http), timeout_ms=30_000)
    try:
        page = await client.multi_list(
            # 200: both clusters take part in the first page (FAIR legs are of 100 items at least).
            MultiListRequest(selection=SELECTION, query=QUERY, limit=200),
            headers=hub_env.auth(**{"x-request-id": "fleet-list-1"}),
        )
        assert {s.cluster: s.outcome for s in page.statuses} == {
            "alpha": ClusterStatus.Outcome.OUTCOME_OK,
            "beta": ClusterStatus.Outcome.OUTCOME_OK,
        }
        for name, agent in agents.items():
            (leg,) = [r for r in agent.resources.records if r.method.endswith("/List")]
            assert leg.headers["x-request-id"] == ["fleet-list-1"], name
            assert leg.subject == "alice", name  # the signature was verified for this cluster

        async def watch() -> None:
            stream = client.multi_watch(
                MultiWatchRequest(selection=SELECTION, query=QUERY),
                headers=hub_env.auth(**{"x-request-id": "fleet-watch-1"}),
            )
            try:
                async for _ in stream:
                    pass
            except ConnectError as exc:  # connectrpc's client turns our cancellation into this
                if exc.code is not Code.CANCELED:
                    raise

        task = asyncio.create_task(watch(), name="test-fanout-legs-watch")
        try:

            def watched() -> bool:
                return all(
                    any(r.method.endswith("/Watch") for r in agent.resources.records)
                    for agent in agents.values()
                )

            await wait_for(watched, WAIT, "a Watch leg at every agent")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for name, agent in agents.items():
            legs = [r for r in agent.resources.records if r.method.endswith("/Watch")]
            assert all(leg.headers["x-request-id"] == ["fleet-watch-1"] for leg in legs), name
            assert all(leg.subject == "alice" for leg in legs), name
    finally:
        await client.close()
        await http.aclose()
