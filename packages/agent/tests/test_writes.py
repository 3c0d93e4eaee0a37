"""Create/Apply/Delete semantics: SSA conflicts and force, dry-run, AlreadyExists, bad manifests,
unknown resources and kinds, Delete's grace period presence and propagation policy."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane, KubeAPIError

from .conftest import CLUSTER, ClientFactory, unique

pytestmark = pytest.mark.integration

CM = {"cluster": CLUSTER, "version": "v1", "resource": "configmaps"}


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def cm_manifest(name: str, **data: str) -> bytes:
    body = "".join(f"\n  {k}: {v!r}" for k, v in data.items())
    return f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:{body or ' {}'}\n".encode()


def admin_get(cp: ControlPlane, path: str) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = cp.request("GET", path)
    except KubeAPIError as exc:
        if exc.status == 404:
            return None
        raise
    return result


async def expect_code(code: Code, call: Any) -> ConnectError:
    with pytest.raises(ConnectError) as info:
        await call
    assert info.value.code is code, info.value.message
    return info.value


async def test_ssa_conflict_then_force(make_client: ClientFactory, namespace: str) -> None:
    rpc = make_client()
    name = unique("ssa")
    await rpc.apply(
        pb.ApplyRequest(
            namespace=namespace, name=name, manifest=cm_manifest(name, x="1"), field_manager="alpha", **CM
        )
    )
    error = await expect_code(
        Code.FAILED_PRECONDITION,
        rpc.apply(
            pb.ApplyRequest(
                namespace=namespace, name=name, manifest=cm_manifest(name, x="2"), field_manager="beta", **CM
            )
        ),
    )
    assert "conflict" in error.message.lower()
    assert "alpha" in error.message
    forced = await rpc.apply(
        pb.ApplyRequest(
            namespace=namespace,
            name=name,
            manifest=cm_manifest(name, x="2"),
            field_manager="beta",
            force=True,
            **CM,
        )
    )
    obj = as_dict(forced.object)
    assert obj["data"] == {"x": "2"}
    managers = {m["manager"] for m in obj["metadata"]["managedFields"]}
    assert "beta" in managers


async def test_apply_default_field_manager(make_client: ClientFactory, namespace: str) -> None:
    rpc = make_client()
    name = unique("mgr")
    applied = await rpc.apply(pb.ApplyRequest(namespace=namespace, manifest=cm_manifest(name, a="b"), **CM))
    assert [m["manager"] for m in as_dict(applied.object)["metadata"]["managedFields"]] == ["otterscale"]


async def test_dry_run_changes_nothing(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client()
    name = unique("dry")
    path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
    created = await rpc.create(
        pb.CreateRequest(namespace=namespace, manifest=cm_manifest(name, a="1"), dry_run=True, **CM)
    )
    assert as_dict(created.object)["metadata"]["name"] == name
    assert admin_get(control_plane, path) is None

    await rpc.create(pb.CreateRequest(namespace=namespace, manifest=cm_manifest(name, a="1"), **CM))
    applied = await rpc.apply(
        pb.ApplyRequest(
            namespace=namespace, name=name, manifest=cm_manifest(name, a="2"), force=True, dry_run=True, **CM
        )
    )
    assert as_dict(applied.object)["data"] == {"a": "2"}
    current = admin_get(control_plane, path)
    assert current is not None
    assert current["data"] == {"a": "1"}

    await rpc.delete(pb.DeleteRequest(namespace=namespace, name=name, dry_run=True, **CM))
    assert admin_get(control_plane, path) is not None


async def test_create_twice_is_already_exists(make_client: ClientFactory, namespace: str) -> None:
    rpc = make_client()
    name = unique("twice")
    request = pb.CreateRequest(namespace=namespace, manifest=cm_manifest(name), **CM)
    await rpc.create(request)
    error = await expect_code(Code.ALREADY_EXISTS, rpc.create(request))
    assert name in error.message


@pytest.mark.parametrize(
    ("manifest", "fragment"),
    [
        (b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [broken\n", "not valid YAML"),
        (b"apiVersion: v1\nmetadata:\n  name: nokind\n", "no kind"),
        (b'{"kind": "ConfigMap", "metadata": {"name": "noversion"}}', "no apiVersion"),
        (b"", "empty"),
    ],
)
async def test_bad_manifests_are_invalid_argument(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane, manifest: bytes, fragment: str
) -> None:
    rpc = make_client()
    error = await expect_code(
        Code.INVALID_ARGUMENT, rpc.create(pb.CreateRequest(namespace=namespace, manifest=manifest, **CM))
    )
    assert fragment in error.message
    await expect_code(
        Code.INVALID_ARGUMENT,
        rpc.apply(pb.ApplyRequest(namespace=namespace, name="x", manifest=manifest, **CM)),
    )
    assert control_plane.request("GET", f"/api/v1/namespaces/{namespace}/configmaps")["items"] == []


async def test_kubernetes_validation_is_invalid_argument(make_client: ClientFactory, namespace: str) -> None:
    rpc = make_client()
    error = await expect_code(
        Code.INVALID_ARGUMENT,
        rpc.create(pb.CreateRequest(namespace=namespace, manifest=cm_manifest("Bad_Name"), **CM)),
    )
    assert "Bad_Name" in error.message  # Kubernetes' own message is kept


async def test_namespace_required(make_client: ClientFactory) -> None:
    rpc = make_client()
    error = await expect_code(
        Code.INVALID_ARGUMENT, rpc.create(pb.CreateRequest(manifest=cm_manifest("x"), **CM))
    )
    assert "namespace is required" in error.message


async def test_unknown_resource_and_kind(make_client: ClientFactory, namespace: str) -> None:
    rpc = make_client()
    error = await expect_code(
        Code.NOT_FOUND, rpc.list(pb.ListRequest(cluster=CLUSTER, version="v1", resource="doesnotexist"))
    )
    assert "doesnotexist" in error.message
    await expect_code(
        Code.NOT_FOUND,
        rpc.get(
            pb.GetRequest(cluster=CLUSTER, group="nope.example", version="v1", resource="things", name="x")
        ),
    )
    await expect_code(
        Code.NOT_FOUND,
        rpc.schema(pb.SchemaRequest(cluster=CLUSTER, group="apps", version="v1", kind="NoSuchKind")),
    )
    await expect_code(
        Code.NOT_FOUND,
        rpc.schema(pb.SchemaRequest(cluster=CLUSTER, group="nope.example", version="v9", kind="X")),
    )
    await expect_code(Code.INVALID_ARGUMENT, rpc.list(pb.ListRequest(cluster=CLUSTER, resource="configmaps")))
    await expect_code(
        Code.NOT_FOUND, rpc.list(pb.ListRequest(cluster="other-cluster", version="v1", resource="pods"))
    )


def _pod(name: str) -> dict[str, Any]:
    # Bound to a node that has no kubelet: graceful deletion then waits (for ever) for the
    # kubelet, so the object stays visible with its deletion grace period.
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": "no-such-node",
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "example.invalid/none:1"}],
        },
    }


async def test_delete_grace_period_presence(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client()
    control_plane.wait_for(
        lambda: admin_get(control_plane, f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
        what="default service account",
    )
    pods = {"cluster": CLUSTER, "version": "v1", "resource": "pods", "namespace": namespace}
    base = f"/api/v1/namespaces/{namespace}/pods"
    for name in ("default-grace", "zero-grace", "five-grace"):
        control_plane.request("POST", base, _pod(name))

    await rpc.delete(pb.DeleteRequest(name="default-grace", **pods))  # field absent: pod's default (30 s)
    await rpc.delete(pb.DeleteRequest(name="zero-grace", grace_period_seconds=0, **pods))
    await rpc.delete(pb.DeleteRequest(name="five-grace", grace_period_seconds=5, **pods))

    default = admin_get(control_plane, f"{base}/default-grace")
    assert default is not None
    assert default["metadata"]["deletionGracePeriodSeconds"] == 30
    assert admin_get(control_plane, f"{base}/zero-grace") is None
    five = admin_get(control_plane, f"{base}/five-grace")
    assert five is not None
    assert five["metadata"]["deletionGracePeriodSeconds"] == 5
    for name in ("default-grace", "five-grace"):
        control_plane.request("DELETE", f"{base}/{name}", {"gracePeriodSeconds": 0})


async def test_delete_propagation_policy(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client()
    base = f"/api/v1/namespaces/{namespace}/configmaps"

    def family(parent: str) -> str:
        owner = control_plane.request(
            "POST", base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": parent}}
        )
        control_plane.request(
            "POST",
            base,
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": f"{parent}-child",
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "ConfigMap",
                            "name": parent,
                            "uid": owner["metadata"]["uid"],
                        }
                    ],
                },
            },
        )
        return f"{base}/{parent}-child"

    orphan_child = family("orphan")
    background_child = family("background")
    await rpc.delete(
        pb.DeleteRequest(
            namespace=namespace, name="orphan", propagation_policy=pb.PROPAGATION_POLICY_ORPHAN, **CM
        )
    )
    await rpc.delete(
        pb.DeleteRequest(
            namespace=namespace, name="background", propagation_policy=pb.PROPAGATION_POLICY_BACKGROUND, **CM
        )
    )
    # The garbage collector deletes the background child and strips the orphan's owner reference.
    control_plane.wait_for(lambda: admin_get(control_plane, background_child) is None, what="child collected")
    control_plane.wait_for(
        lambda: not (admin_get(control_plane, orphan_child) or {"metadata": {"ownerReferences": [1]}})[
            "metadata"
        ].get("ownerReferences"),
        what="child orphaned",
    )
    await asyncio.sleep(0)
