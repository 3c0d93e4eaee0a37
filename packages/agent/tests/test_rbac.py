"""Calls run with the caller's rights (impersonation), never with the agent's own."""

from __future__ import annotations

from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import Identity
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane

from .conftest import CLUSTER, ClientFactory, unique

pytestmark = pytest.mark.integration

RBAC = "rbac.authorization.k8s.io/v1"


def _make_namespace(cp: ControlPlane) -> str:
    name = unique("rbac")
    cp.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    return name


def _grant_configmap_reader(cp: ControlPlane, namespace: str, subject: dict[str, str]) -> None:
    cp.apply(
        {
            "apiVersion": RBAC,
            "kind": "Role",
            "metadata": {"name": "cm-reader", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
        }
    )
    cp.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": RBAC,
            "kind": "RoleBinding",
            "metadata": {"name": unique("cm-reader")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
            "subjects": [{**subject, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    )


@pytest.fixture(scope="module")
def rbac_setup(control_plane: ControlPlane) -> dict[str, Any]:
    """Namespaces a and b; user U may read configmaps in a; group G may read them in a too."""
    a, b = _make_namespace(control_plane), _make_namespace(control_plane)
    user, group = unique("user"), unique("team")
    _grant_configmap_reader(control_plane, a, {"kind": "User", "name": user})
    _grant_configmap_reader(control_plane, a, {"kind": "Group", "name": group})
    control_plane.request(
        "POST",
        f"/api/v1/namespaces/{b}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "secret-ish"}},
    )
    # RBAC works from informer caches: wait until both bindings are in effect.
    for headers in ({"Impersonate-User": user}, {"Impersonate-User": "probe", "Impersonate-Group": group}):
        control_plane.wait_for(
            lambda h=headers: control_plane.request("GET", f"/api/v1/namespaces/{a}/configmaps", headers=h),
            what="role binding in effect",
        )
    return {"a": a, "b": b, "user": user, "group": group}


async def _list(rpc: Any, namespace: str) -> pb.ListResponse:
    return await rpc.list(
        pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace)
    )


async def _denied(call: Any) -> ConnectError:
    with pytest.raises(ConnectError) as info:
        await call
    assert info.value.code is Code.PERMISSION_DENIED, info.value.message
    return info.value


async def test_user_binding_is_enforced(make_client: ClientFactory, rbac_setup: dict[str, Any]) -> None:
    rpc = make_client(Identity(rbac_setup["user"]))
    await _list(rpc, rbac_setup["a"])
    error = await _denied(_list(rpc, rbac_setup["b"]))
    assert rbac_setup["user"] in error.message  # Kubernetes names the impersonated user
    await _denied(_list(rpc, ""))  # all namespaces needs a cluster-wide grant


async def test_group_binding_is_enforced(make_client: ClientFactory, rbac_setup: dict[str, Any]) -> None:
    member = make_client(Identity(unique("member"), (rbac_setup["group"],)))
    await _list(member, rbac_setup["a"])
    await _denied(_list(member, rbac_setup["b"]))
    outsider = make_client(Identity(unique("outsider"), ("some-other-group",)))
    await _denied(_list(outsider, rbac_setup["a"]))


async def test_agent_rights_do_not_leak(
    make_client: ClientFactory, rbac_setup: dict[str, Any], control_plane: ControlPlane
) -> None:
    rpc = make_client(Identity(rbac_setup["user"]))
    a = rbac_setup["a"]
    await _denied(rpc.list(pb.ListRequest(cluster=CLUSTER, version="v1", resource="nodes")))
    await _denied(rpc.list(pb.ListRequest(cluster=CLUSTER, version="v1", resource="secrets", namespace=a)))
    await _denied(
        rpc.create(
            pb.CreateRequest(
                cluster=CLUSTER,
                version="v1",
                resource="configmaps",
                namespace=a,
                manifest=b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: sneaky\n",
            )
        )
    )
    await _denied(
        rpc.delete(
            pb.DeleteRequest(
                cluster=CLUSTER,
                version="v1",
                resource="configmaps",
                namespace=rbac_setup["b"],
                name="secret-ish",
            )
        )
    )
    with pytest.raises(ConnectError) as info:
        async for _ in rpc.watch(
            pb.WatchRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=rbac_setup["b"])
        ):
            pass
    assert info.value.code is Code.PERMISSION_DENIED
    assert control_plane.request("GET", f"/api/v1/namespaces/{rbac_setup['b']}/configmaps/secret-ish")
    assert control_plane.request("GET", f"/api/v1/namespaces/{a}/configmaps")["items"] == []
    # Discovery and Schema use the agent's own (read-only, non-secret) rights.
    discovered = await rpc.discovery(pb.DiscoveryRequest(cluster=CLUSTER))
    assert discovered.api_resources


async def test_concurrent_callers_do_not_share_identity(
    make_client: ClientFactory, rbac_setup: dict[str, Any]
) -> None:
    """Interleaved calls of an admin and a restricted user through the agent's one connection pool."""
    import asyncio

    admin = make_client(transport="grpc-h2c")
    user = make_client(Identity(rbac_setup["user"]), transport="grpc-h2c")
    calls = [_list(admin if i % 2 == 0 else user, rbac_setup["b"]) for i in range(30)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 2 == 0:
            assert isinstance(result, pb.ListResponse), result
        else:
            assert isinstance(result, ConnectError), result
            assert result.code is Code.PERMISSION_DENIED
