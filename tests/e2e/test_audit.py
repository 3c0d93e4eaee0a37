"""The audit trail, end to end (issue 13, part 6): one event per write, with the refusal code.

Through the real hub and agent of ``chart_rbac_system`` (OS processes, real chisel, a real
kube-apiserver deciding with its own RBAC), whose hub writes its audit trail to a file
(``audit: {sink: file}``, reads not audited). Each call carries its own request id, so the test
finds exactly the events that call produced. No token and no manifest content may appear in the
trail.
"""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.resource.v1 import resource_pb2 as pb

from .conftest import CHART_RBAC_CLUSTER, TEAM, ChartRbacSystem

pytestmark = [pytest.mark.e2e, pytest.mark.security]

RESOURCE = "otterscale.resource.v1.ResourceService"


def events_of(stack: ChartRbacSystem, request_id: str) -> list[dict[str, Any]]:
    """The audit events of one call. The hub writes an event before it answers, so a call that
    has returned has its event in the file already."""
    return [event for event in stack.audit_events() if event["request_id"] == request_id]


def configmap(name: str, canary: str) -> bytes:
    return json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"note": canary}}
    ).encode()


async def test_writes_give_exactly_one_event_each_with_what_and_how_it_ended(stack: ChartRbacSystem) -> None:
    client, http = stack.client()
    canary = f"MANIFEST-CANARY-{uuid.uuid4().hex}"
    name = f"audited-{uuid.uuid4().hex[:8]}"
    alice = stack.token("alice", (TEAM,))
    bob = stack.token("bob", ("oidc:team-b",))
    ids = {
        step: f"audit-{step}-{uuid.uuid4().hex[:8]}" for step in ("create", "denied", "delete", "anon", "get")
    }
    create = pb.CreateRequest(
        cluster=CHART_RBAC_CLUSTER, version="v1", resource="configmaps", namespace=stack.namespace,
        manifest=configmap(name, canary),
    )  # fmt: skip
    try:
        created = await client.create(
            create, headers={"authorization": f"Bearer {alice}", "x-request-id": ids["create"]}
        )
        assert created.object["metadata"]["name"] == name
        with pytest.raises(ConnectError) as denied:
            await client.create(
                create, headers={"authorization": f"Bearer {bob}", "x-request-id": ids["denied"]}
            )
        assert denied.value.code is Code.PERMISSION_DENIED
        delete = pb.DeleteRequest(
            cluster=CHART_RBAC_CLUSTER, version="v1", resource="configmaps", namespace=stack.namespace,
            name=name, dry_run=True,
        )  # fmt: skip
        await client.delete(
            delete, headers={"authorization": f"Bearer {alice}", "x-request-id": ids["delete"]}
        )
        with pytest.raises(ConnectError) as anonymous:
            await client.create(
                create, headers={"authorization": "Bearer not-a-token", "x-request-id": ids["anon"]}
            )
        assert anonymous.value.code is Code.UNAUTHENTICATED
        get = pb.GetRequest(
            cluster=CHART_RBAC_CLUSTER,
            version="v1",
            resource="configmaps",
            namespace=stack.namespace,
            name=name,
        )
        await client.get(get, headers={"authorization": f"Bearer {alice}", "x-request-id": ids["get"]})
    finally:
        await client.close()
        await http.aclose()

    common = {
        "component": "hub",
        "replica": socket.gethostname(),
        "cluster": CHART_RBAC_CLUSTER,
        "service": RESOURCE,
        "group": "",
        "version": "v1",
        "resource": "configmaps",
        "namespace": stack.namespace,
        "forwarded_by": "",
    }
    [created_event] = events_of(stack, ids["create"])
    assert created_event | common == created_event  # every common field as expected
    assert created_event["verb"] == "Create"
    assert created_event["subject"] == "alice"
    assert created_event["groups"] == [TEAM]
    assert created_event["name"] == name  # read from the created object, not from the manifest
    assert created_event["dry_run"] is False
    assert created_event["code"] == "ok"
    assert created_event["source"].startswith("127.0.0.1:")
    assert created_event["duration_ms"] > 0
    assert created_event["time"].endswith("Z")

    [denied_event] = events_of(stack, ids["denied"])
    assert denied_event | common == denied_event
    assert (denied_event["verb"], denied_event["subject"], denied_event["groups"]) == (
        "Create",
        "bob",
        ["oidc:team-b"],
    )
    assert denied_event["code"] == "permission_denied"
    assert denied_event["name"] == ""  # nothing was created; the manifest is not parsed

    [deleted_event] = events_of(stack, ids["delete"])
    assert deleted_event | common == deleted_event
    assert (deleted_event["verb"], deleted_event["name"], deleted_event["dry_run"]) == ("Delete", name, True)
    assert deleted_event["code"] == "ok"

    [anonymous_event] = events_of(stack, ids["anon"])
    assert (anonymous_event["verb"], anonymous_event["code"]) == ("Create", "unauthenticated")
    assert (anonymous_event["subject"], anonymous_event["groups"]) == ("", [])
    # Refused from its headers: an unauthenticated request's body (and the cluster it names) is
    # never read (issue 13, part 2).
    assert anonymous_event["cluster"] == ""

    assert events_of(stack, ids["get"]) == []  # reads are not audited by default (audit.reads: off)

    trail = stack.audit_log.read_text()
    assert canary not in trail
    assert "not-a-token" not in trail
    for token in (alice, bob):
        assert token not in trail
        assert token.rsplit(".", 1)[1] not in trail
    for secret in stack.system.secrets():
        assert secret not in trail

    # The events went to their own sink: the hub's log has no audit line.
    for line in stack.system.hub_log.read_text().splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        assert not (record.get("component") == "hub" and "verb" in record), line
