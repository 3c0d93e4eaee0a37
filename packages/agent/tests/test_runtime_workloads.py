"""Scale, GetScale and Restart through the agent, against a real control plane.

The session's control plane runs only the namespace, garbage-collector and service-account
controllers, so these tests check what the API stores (the Deployment's ``spec.replicas``, the
template annotation that makes the Deployment controller roll); that Pods really follow is
tested on the real node (``tests/e2e/test_runtime.py``). Every call is made as a signed caller,
as the hub would, so RBAC is the caller's: a ``view`` user may read the scale but neither scale
nor restart.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import Identity
from otterscale.runtime.v1 import runtime_pb2 as pb
from otterscale.runtime.v1.runtime_connect import RuntimeServiceClient
from otterscale.testing import ControlPlane

from .conftest import CLUSTER, ClientFactory, unique

pytestmark = pytest.mark.integration

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


def deployment(name: str, replicas: int = 1, *, paused: bool = False) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "paused": paused,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            },
        },
    }


def statefulset(name: str, replicas: int = 1) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            },
        },
    }


def create(cp: ControlPlane, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    plural = obj["kind"].lower() + "s"
    created: dict[str, Any] = cp.request("POST", f"/apis/apps/v1/namespaces/{namespace}/{plural}", obj)
    return created


def runtime(
    make_client: ClientFactory, identity: Identity | None = None, **kwargs: Any
) -> RuntimeServiceClient:
    if identity is not None:
        kwargs["identity"] = identity
    client: RuntimeServiceClient = make_client(service=RuntimeServiceClient, **kwargs)
    return client


def scale_request(namespace: str, name: str, replicas: int, **extra: Any) -> pb.ScaleRequest:
    return pb.ScaleRequest(
        cluster=CLUSTER,
        group="apps",
        version="v1",
        resource="deployments",
        namespace=namespace,
        name=name,
        replicas=replicas,
        **extra,
    )


def get_scale_request(namespace: str, name: str, resource: str = "deployments") -> pb.GetScaleRequest:
    return pb.GetScaleRequest(
        cluster=CLUSTER, group="apps", version="v1", resource=resource, namespace=namespace, name=name
    )


def restart_request(
    namespace: str, name: str, resource: str = "deployments", group: str = "apps"
) -> pb.RestartRequest:
    return pb.RestartRequest(
        cluster=CLUSTER, group=group, version="v1", resource=resource, namespace=namespace, name=name
    )


async def failure(call: Any) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        await call
    return caught.value


@pytest.fixture
def viewer(control_plane: ControlPlane, namespace: str) -> Identity:
    """A user bound to the built-in ``view`` role in the test namespace only."""
    user = Identity(unique("viewer"))
    control_plane.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "User", "name": user.subject, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    )
    control_plane.wait_for(
        lambda: control_plane.request(
            "GET",
            f"/apis/apps/v1/namespaces/{namespace}/deployments",
            headers={"Impersonate-User": user.subject},
        ),
        what="view binding in effect",
    )
    return user


async def test_get_scale_reads_the_scale_subresource(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str, transport: str
) -> None:
    name = unique("web")
    create(control_plane, namespace, deployment(name, replicas=2))
    client = runtime(make_client, transport=transport)
    got = await client.get_scale(get_scale_request(namespace, name))
    assert got.replicas == 2
    assert got.previous_replicas == 2
    assert got.selector == f"app={name}"
    assert 0 <= got.status_replicas <= 2


async def test_scale_changes_the_desired_count(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str, transport: str
) -> None:
    name = unique("web")
    create(control_plane, namespace, deployment(name, replicas=1))
    client = runtime(make_client, transport=transport)
    answer = await client.scale(scale_request(namespace, name, 3))
    assert answer.replicas == 3
    assert answer.previous_replicas == 1
    assert answer.selector == f"app={name}"
    stored = control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    assert stored["spec"]["replicas"] == 3
    answer = await client.scale(scale_request(namespace, name, 0))
    assert (answer.previous_replicas, answer.replicas) == (3, 0)
    stored = control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    assert stored["spec"]["replicas"] == 0


async def test_scale_a_statefulset(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str
) -> None:
    name = unique("db")
    create(control_plane, namespace, statefulset(name, replicas=1))
    client = runtime(make_client)
    request = scale_request(namespace, name, 2)
    request.resource = "statefulsets"
    answer = await client.scale(request)
    assert (answer.previous_replicas, answer.replicas) == (1, 2)
    stored = control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}")
    assert stored["spec"]["replicas"] == 2


async def test_current_replicas_precondition(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str
) -> None:
    name = unique("web")
    create(control_plane, namespace, deployment(name, replicas=2))
    client = runtime(make_client)
    error = await failure(client.scale(scale_request(namespace, name, 5, current_replicas=1)))
    assert error.code is Code.FAILED_PRECONDITION
    assert "2 desired replicas, not 1" in error.message
    stored = control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    assert stored["spec"]["replicas"] == 2  # nothing changed
    answer = await client.scale(scale_request(namespace, name, 4, current_replicas=2))
    assert (answer.previous_replicas, answer.replicas) == (2, 4)
    # An explicit 0 is a precondition too (presence), not "no precondition".
    error = await failure(client.scale(scale_request(namespace, name, 1, current_replicas=0)))
    assert error.code is Code.FAILED_PRECONDITION


async def test_concurrent_scales_all_succeed(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str
) -> None:
    """Writers racing on one Scale conflict (409); each is retried from a fresh read, none fails."""
    name = unique("web")
    create(control_plane, namespace, deployment(name, replicas=1))
    clients = [runtime(make_client, transport="connect-h2c") for _ in range(2)]
    answers = await asyncio.gather(
        *(
            clients[i % 2].scale(scale_request(namespace, name, replicas))
            for i, replicas in enumerate(range(2, 6))
        )
    )
    assert sorted(a.replicas for a in answers) == list(range(2, 6))
    stored = control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    assert stored["spec"]["replicas"] in range(2, 6)


@pytest.mark.parametrize(
    ("change", "code", "fragment"),
    [
        ({"replicas": -1}, Code.INVALID_ARGUMENT, "replicas must not be negative"),
        ({"current_replicas": -3}, Code.INVALID_ARGUMENT, "current_replicas must not be negative"),
        ({"name": ""}, Code.INVALID_ARGUMENT, "name is required"),
        ({"version": ""}, Code.INVALID_ARGUMENT, "version is required"),
        ({"resource": "configmaps", "group": ""}, Code.NOT_FOUND, "could not find"),
        ({"resource": "nothings"}, Code.NOT_FOUND, "does not serve resource"),
        ({"cluster": "elsewhere"}, Code.NOT_FOUND, "serves cluster"),
    ],
)
async def test_scale_refusals(
    make_client: ClientFactory,
    control_plane: ControlPlane,
    namespace: str,
    change: dict[str, Any],
    code: Code,
    fragment: str,
) -> None:
    name = unique("web")
    create(control_plane, namespace, deployment(name, replicas=1))
    request = scale_request(namespace, name, 2)
    for field, value in change.items():
        setattr(request, field, value)
    error = await failure(runtime(make_client).scale(request))
    assert error.code is code, error.message
    assert fragment in error.message
    stored = control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    assert stored["spec"]["replicas"] == 1


def _template_annotation(cp: ControlPlane, namespace: str, plural: str, name: str) -> str | None:
    obj = cp.request("GET", f"/apis/apps/v1/namespaces/{namespace}/{plural}/{name}")
    value: str | None = ((obj["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(
        RESTARTED_AT
    )
    return value


async def test_restart_changes_the_template_every_time(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str, transport: str
) -> None:
    name = unique("web")
    created = create(control_plane, namespace, deployment(name, replicas=1))
    client = runtime(make_client, transport=transport)
    await client.restart(restart_request(namespace, name))
    first = _template_annotation(control_plane, namespace, "deployments", name)
    assert first is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first)  # RFC 3339, UTC, as kubectl
    # At once again: the same second would write the same value (no rollout); it must not.
    await client.restart(restart_request(namespace, name))
    second = _template_annotation(control_plane, namespace, "deployments", name)
    assert second is not None
    assert second > first
    stored = control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    # Each restart changed the pod template: that is what makes the Deployment controller roll.
    assert stored["metadata"]["generation"] == created["metadata"]["generation"] + 2


async def test_restart_statefulset_and_daemonset(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str
) -> None:
    client = runtime(make_client)
    db = unique("db")
    create(control_plane, namespace, statefulset(db))
    await client.restart(restart_request(namespace, db, "statefulsets"))
    assert _template_annotation(control_plane, namespace, "statefulsets", db)
    agent = unique("node-agent")
    daemonset = deployment(agent)
    daemonset["kind"] = "DaemonSet"
    del daemonset["spec"]["replicas"], daemonset["spec"]["paused"]
    create(control_plane, namespace, daemonset)
    await client.restart(restart_request(namespace, agent, "daemonsets"))
    assert _template_annotation(control_plane, namespace, "daemonsets", agent)


async def test_restart_refuses_a_paused_deployment(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str
) -> None:
    name = unique("web")
    create(control_plane, namespace, deployment(name, paused=True))
    error = await failure(runtime(make_client).restart(restart_request(namespace, name)))
    assert error.code is Code.FAILED_PRECONDITION
    assert "paused" in error.message
    assert _template_annotation(control_plane, namespace, "deployments", name) is None


@pytest.mark.parametrize(
    ("group", "resource"),
    [("apps", "replicasets"), ("", "configmaps"), ("batch", "cronjobs"), ("", "pods")],
)
async def test_restart_refuses_what_would_not_roll(
    make_client: ClientFactory, namespace: str, group: str, resource: str
) -> None:
    error = await failure(runtime(make_client).restart(restart_request(namespace, "x", resource, group)))
    assert error.code is Code.INVALID_ARGUMENT
    assert f"cannot restart '{resource}'" in error.message


async def test_restart_of_a_missing_deployment_is_not_found(
    make_client: ClientFactory, namespace: str
) -> None:
    error = await failure(runtime(make_client).restart(restart_request(namespace, unique("missing"))))
    assert error.code is Code.NOT_FOUND


async def test_view_user_reads_the_scale_but_cannot_change_anything(
    make_client: ClientFactory, control_plane: ControlPlane, namespace: str, viewer: Identity
) -> None:
    name = unique("web")
    create(control_plane, namespace, deployment(name, replicas=1))
    client = runtime(make_client, viewer)
    assert (await client.get_scale(get_scale_request(namespace, name))).replicas == 1
    error = await failure(client.scale(scale_request(namespace, name, 3)))
    assert error.code is Code.PERMISSION_DENIED
    assert viewer.subject in error.message  # Kubernetes' message names the impersonated user
    error = await failure(client.restart(restart_request(namespace, name)))
    assert error.code is Code.PERMISSION_DENIED
    stored = control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    assert stored["spec"]["replicas"] == 1
    assert RESTARTED_AT not in (stored["spec"]["template"]["metadata"].get("annotations") or {})


async def test_unsigned_runtime_calls_are_refused(make_client: ClientFactory, namespace: str) -> None:
    client: RuntimeServiceClient = make_client(identity=None, service=RuntimeServiceClient)
    error = await failure(client.get_scale(get_scale_request(namespace, "x")))
    assert error.code is Code.UNAUTHENTICATED
