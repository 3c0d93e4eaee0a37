"""Describe: an object and its events, as the caller, against a real kube-apiserver and
kube-controller-manager (which fills the aggregated ``view`` ClusterRole).

Events are created as admin, with the times and involvedObject references real components
write (the kubelet refers to a Node by name in the uid field), so no kubelet is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format

from otterscale.agent import _events
from otterscale.agent._discovery import APIResourceInfo
from otterscale.common import Identity
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane, KubeAPIError

from .conftest import ADMIN, CLUSTER, ClientFactory, unique

pytestmark = pytest.mark.integration

RBAC = "rbac.authorization.k8s.io"
CONFIGMAPS = APIResourceInfo(group="", version="v1", resource="configmaps", kind="ConfigMap", namespaced=True)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Created in this (name) order, which is not their time order; `when` is what sorts them.
TIMED_EVENTS: dict[str, dict[str, str]] = {
    "e-a": {"lastTimestamp": "2020-01-01T00:00:03Z"},
    # eventTime has microseconds: as text, "01.500000Z" would sort before "01Z" (e-c)
    "e-b": {"eventTime": "2020-01-01T00:00:01.500000Z"},
    "e-c": {"lastTimestamp": "2020-01-01T00:00:01Z"},
    "e-d": {"firstTimestamp": "2020-01-01T00:00:02Z"},
    "e-e": {},  # no time at all: its creationTimestamp (now) makes it the newest
    # eventTime wins over lastTimestamp
    "e-f": {"eventTime": "2020-01-01T00:00:00.250000Z", "lastTimestamp": "2020-01-01T00:00:04Z"},
}
TIME_ORDER = ["e-f", "e-c", "e-b", "e-d", "e-a", "e-e"]


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def create_event(
    cp: ControlPlane, namespace: str, name: str, involved: dict[str, str], times: dict[str, str] | None = None
) -> dict[str, Any]:
    """A core/v1 Event as admin; an ``eventTime`` event carries what validation requires of one."""
    times = times or {}
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": involved,
        "reason": "Testing",
        "message": f"event {name}",
        "type": "Normal",
        "source": {"component": "otterscale-tests"},
        **times,
    }
    if "eventTime" in times:
        body |= {
            "reportingComponent": "otterscale.test/tests",
            "reportingInstance": "tests",
            "action": "Test",
        }
    created: dict[str, Any] = cp.request("POST", f"/api/v1/namespaces/{namespace}/events", body)
    return created


def involved(obj: dict[str, Any], *, uid: str | None = None) -> dict[str, str]:
    metadata = obj["metadata"]
    ref = {
        "apiVersion": obj.get("apiVersion", "v1"),
        "kind": obj.get("kind", "ConfigMap"),
        "name": metadata["name"],
        "uid": uid or metadata["uid"],
    }
    if metadata.get("namespace"):
        ref["namespace"] = metadata["namespace"]
    return ref


def bind(cp: ControlPlane, namespace: str, user: str, role_kind: str, role: str) -> None:
    cp.request(
        "POST",
        f"/apis/{RBAC}/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": f"{RBAC}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": unique("describe")},
            "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role},
            "subjects": [{"kind": "User", "name": user, "apiGroup": RBAC}],
        },
    )


def wait_allowed(cp: ControlPlane, user: str, path: str) -> None:
    """RBAC works from informer caches (and ``view`` is filled by kube-controller-manager)."""
    cp.wait_for(
        lambda: cp.request("GET", path, headers={"Impersonate-User": user}), what=f"{user} may GET {path}"
    )


def configmap(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    created: dict[str, Any] = cp.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "annotations": {LAST_APPLIED: "{}", "keep": "me"}},
            "data": {"k": "v"},
        },
    )
    assert created["metadata"]["managedFields"]  # so that cleaning it away is visible
    return created


@pytest.fixture
def timed(control_plane: ControlPlane, namespace: str) -> dict[str, Any]:
    """A ConfigMap with the six TIMED_EVENTS, plus events that are not its own."""
    cm = configmap(control_plane, namespace, "described")
    for name, times in TIMED_EVENTS.items():
        create_event(control_plane, namespace, name, involved(cm), times)
    other = configmap(control_plane, namespace, "other")
    create_event(control_plane, namespace, "noise-other", involved(other))
    # same name, another uid: an earlier object of that name (deleted and re-created)
    create_event(
        control_plane, namespace, "noise-earlier", involved(cm, uid="0f0f0f0f-0000-4000-8000-000000000000")
    )
    return cm


def describe_request(namespace: str, name: str = "described", **extra: Any) -> pb.DescribeRequest:
    return pb.DescribeRequest(
        cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace, name=name, **extra
    )


def event_names(response: pb.DescribeResponse) -> list[str]:
    return [as_dict(e.object)["metadata"]["name"] for e in response.events]


async def test_a_viewer_describes_an_object_with_its_events_sorted_and_cleaned(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str, timed: dict[str, Any]
) -> None:
    viewer = unique("viewer")
    bind(control_plane, namespace, viewer, "ClusterRole", "view")
    wait_allowed(control_plane, viewer, f"/api/v1/namespaces/{namespace}/events")
    rpc = make_client(Identity(viewer), json=True)  # the dashboard's codec

    response = await rpc.describe(describe_request(namespace))
    assert response.events_error == ""
    obj = as_dict(response.resource.object)
    assert (obj["kind"], obj["apiVersion"], obj["metadata"]["uid"]) == (
        "ConfigMap",
        "v1",
        timed["metadata"]["uid"],
    )
    assert "managedFields" not in obj["metadata"]
    assert obj["metadata"]["annotations"] == {"keep": "me"}
    assert event_names(response) == TIME_ORDER
    for event in response.events:
        fields = as_dict(event.object)
        assert (fields["kind"], fields["apiVersion"]) == ("Event", "v1")
        assert "managedFields" not in fields["metadata"]
        assert fields["involvedObject"]["uid"] == timed["metadata"]["uid"]

    limited = await rpc.describe(describe_request(namespace, events_limit=3))
    assert event_names(limited) == TIME_ORDER[-3:]  # the newest three, still oldest first
    assert event_names(await rpc.describe(describe_request(namespace, events_limit=1))) == ["e-e"]


async def test_events_are_paged_through_and_the_scan_is_bounded(
    control_plane: ControlPlane, namespace: str, timed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """kube-apiserver lists in name order, not time order: every page is read (``continue``
    followed) before the newest are chosen; past MAX_SCANNED events the answer says so.

    Pages of 500 and a bound of 10,000 events would need thousands of events to show; so the
    events scan runs here on its own (the agent's ``_events``, in the test's process) against the
    real kube-apiserver, with pages of 2 and a bound of 4 for these six events. The agent process
    answers Describe with it (the tests above)."""
    from otterscale.agent import load_connection
    from otterscale.agent._kube import KubeClient

    client = await KubeClient.open(await load_connection(str(control_plane.kubeconfig), {}))
    try:

        async def scan(limit: int) -> _events.EventsResult:
            return await _events.list_object_events(
                client, CONFIGMAPS, timed, caller=ADMIN, limit=limit, time_limit=lambda: 30.0
            )

        monkeypatch.setattr(_events, "PAGE_SIZE", 2)  # six events: three pages
        paged = await scan(3)
        assert ([e["metadata"]["name"] for e in paged.events], paged.error) == (TIME_ORDER[-3:], "")

        monkeypatch.setattr(_events, "MAX_SCANNED", 4)  # stops after e-a..e-d (two pages)
        bounded = await scan(_events.DEFAULT_EVENTS_LIMIT)
        assert [e["metadata"]["name"] for e in bounded.events] == ["e-c", "e-b", "e-d", "e-a"]
        assert bounded.error.startswith("more than 4 events match")
    finally:
        await client.close()


async def test_without_the_right_to_list_events_the_object_comes_with_events_error(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str, timed: dict[str, Any]
) -> None:
    reader = unique("reader")
    control_plane.request(
        "POST",
        f"/apis/{RBAC}/v1/namespaces/{namespace}/roles",
        {
            "apiVersion": f"{RBAC}/v1",
            "kind": "Role",
            "metadata": {"name": "cm-getter"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
        },
    )
    bind(control_plane, namespace, reader, "Role", "cm-getter")
    wait_allowed(control_plane, reader, f"/api/v1/namespaces/{namespace}/configmaps/described")

    response = await make_client(Identity(reader)).describe(describe_request(namespace))
    assert as_dict(response.resource.object)["metadata"]["uid"] == timed["metadata"]["uid"]
    assert list(response.events) == []
    assert response.events_error == f'forbidden: cannot list events in namespace "{namespace}"'

    # Without the right to get the object, the call itself is refused.
    stranger = unique("stranger")
    with pytest.raises(ConnectError) as denied:
        await make_client(Identity(stranger)).describe(describe_request(namespace))
    assert denied.value.code is Code.PERMISSION_DENIED
    assert stranger in denied.value.message


@pytest.fixture
def node(control_plane: ControlPlane) -> Iterator[dict[str, Any]]:
    """A Node object (no kubelet behind it), deleted after the test with the events it got."""
    name = unique("node")
    created: dict[str, Any] = control_plane.request(
        "POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    )
    yield created
    with contextlib.suppress(KubeAPIError):
        control_plane.request("DELETE", f"/api/v1/nodes/{name}")
    for event in control_plane.request("GET", "/api/v1/namespaces/default/events")["items"]:
        if event["metadata"]["name"].startswith(name):
            with contextlib.suppress(KubeAPIError):
                control_plane.request(
                    "DELETE", f"/api/v1/namespaces/default/events/{event['metadata']['name']}"
                )


async def test_a_node_is_described_with_the_events_that_name_it(
    make_client: ClientFactory, control_plane: ControlPlane, node: dict[str, Any]
) -> None:
    """The kubelet records node events with the node's *name* as uid (a uid selector alone misses
    them); controllers use the real uid. Both are found, each once; another node's are not."""
    name, uid = node["metadata"]["name"], node["metadata"]["uid"]
    as_kubelet = {"kind": "Node", "name": name, "uid": name}
    as_controller = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}
    create_event(
        control_plane, "default", f"{name}.kubelet", as_kubelet, {"lastTimestamp": "2020-01-01T00:00:02Z"}
    )
    create_event(
        control_plane,
        "default",
        f"{name}.controller",
        as_controller,
        {"lastTimestamp": "2020-01-01T00:00:01Z"},
    )
    other = {"kind": "Node", "name": f"{name}-other", "uid": f"{name}-other"}
    create_event(control_plane, "default", f"{name}.other", other)

    response = await make_client().describe(
        pb.DescribeRequest(cluster=CLUSTER, version="v1", resource="nodes", name=name)
    )
    assert response.events_error == ""
    assert as_dict(response.resource.object)["metadata"]["uid"] == uid
    names = event_names(response)
    assert len(names) == len(set(names))  # found by both selectors, listed once
    ours = [n for n in names if n.startswith(name)]
    assert ours == [f"{name}.controller", f"{name}.kubelet"]  # oldest first; not ".other"
    # Anything else is kube-controller-manager's own event about this node.
    for event in response.events:
        assert as_dict(event.object)["involvedObject"]["name"] == name


@pytest.mark.parametrize(
    ("fields", "code", "mentions"),
    [
        ({"name": ""}, Code.INVALID_ARGUMENT, "name"),
        ({"events_limit": 0}, Code.INVALID_ARGUMENT, "events_limit"),
        ({"events_limit": 1001}, Code.INVALID_ARGUMENT, "events_limit"),
        ({"events_limit": -1}, Code.INVALID_ARGUMENT, "events_limit"),
        ({"version": ""}, Code.INVALID_ARGUMENT, "version"),
        ({"resource": ""}, Code.INVALID_ARGUMENT, "resource"),
        ({"namespace": ""}, Code.INVALID_ARGUMENT, "namespace"),
        ({"resource": "configmapz"}, Code.NOT_FOUND, "configmapz"),
        ({"resource": "pods/log"}, Code.NOT_FOUND, "pods/log"),  # listed by Discovery, not an object
        ({"name": "no-such-object"}, Code.NOT_FOUND, "no-such-object"),
        ({"cluster": "elsewhere"}, Code.NOT_FOUND, "elsewhere"),
    ],
)
async def test_bad_input(
    make_client: ClientFactory, namespace: str, fields: dict[str, Any], code: Code, mentions: str
) -> None:
    request = describe_request(namespace, name="anything")
    for field, value in fields.items():
        setattr(request, field, value)
    with pytest.raises(ConnectError) as info:
        await make_client().describe(request)
    assert info.value.code is code, info.value.message
    assert mentions in info.value.message


async def test_the_default_limit_is_100(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str
) -> None:
    cm = configmap(control_plane, namespace, "busy")
    for i in range(_events.DEFAULT_EVENTS_LIMIT + 5):
        create_event(
            control_plane,
            namespace,
            f"busy-{i:03d}",
            involved(cm),
            {"lastTimestamp": f"2020-01-01T00:{i // 60:02d}:{i % 60:02d}Z"},
        )
    response = await make_client(ADMIN).describe(describe_request(namespace, name="busy"))
    assert event_names(response) == [f"busy-{i:03d}" for i in range(5, 105)]
    assert response.events_error == ""
