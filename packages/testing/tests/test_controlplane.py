"""The test control plane is a real Kubernetes: CRDs, RBAC, controllers, version stamping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from otterscale.testing import ControlPlane, KubeAPIError
from otterscale.testing.tools import KUBERNETES_VERSION, ToolMissingError, tool_path

pytestmark = pytest.mark.integration

CRD_GROUP = "fixture.otterscale.io"


def _crd(plural: str, kind: str, scope: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{CRD_GROUP}"},
        "spec": {
            "group": CRD_GROUP,
            "scope": scope,
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": kind + "List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}
                            },
                        }
                    },
                }
            ],
        },
    }


def test_version_is_stamped(control_plane: ControlPlane) -> None:
    version = control_plane.request("GET", "/version")
    assert version["gitVersion"] == KUBERNETES_VERSION
    assert version["minor"] == KUBERNETES_VERSION.split(".")[1]


def test_crd_becomes_established_and_serves_objects(control_plane: ControlPlane) -> None:
    crd = _crd("widgets", "Widget", "Namespaced")
    control_plane.apply(crd)

    def established() -> bool:
        got = control_plane.request(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{CRD_GROUP}"
        )
        return any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (got.get("status") or {}).get("conditions") or []
        )

    control_plane.wait_for(established, what="CRD Established")
    name = f"w-{uuid.uuid4().hex[:6]}"
    obj = {
        "apiVersion": f"{CRD_GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"size": 3},
    }
    # The API server may need a moment after Established to serve the new resource.
    control_plane.wait_for(lambda: control_plane.apply(obj), what="custom object created")
    listed = control_plane.request("GET", f"/apis/{CRD_GROUP}/v1/namespaces/default/widgets")
    assert [(i["metadata"]["name"], i["spec"]["size"]) for i in listed["items"]] == [(name, 3)]
    bad_obj = {**obj, "metadata": {"name": name + "-bad", "namespace": "default"}, "spec": {"size": "x"}}
    with pytest.raises(KubeAPIError) as bad:
        control_plane.request("POST", f"/apis/{CRD_GROUP}/v1/namespaces/default/widgets", bad_obj)
    assert bad.value.status == 422  # the CRD's structural schema is enforced


def test_rbac_denies_an_unbound_user_and_allows_a_bound_one(control_plane: ControlPlane) -> None:
    ns = f"rbac-{uuid.uuid4().hex[:6]}"
    control_plane.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    )
    as_alice = {"Impersonate-User": "alice", "Impersonate-Group": "system:authenticated"}
    with pytest.raises(KubeAPIError) as denied:
        control_plane.request("GET", f"/api/v1/namespaces/{ns}/configmaps", headers=as_alice)
    assert denied.value.status == 403
    assert "alice" in denied.value.body["message"]

    control_plane.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "alice-view", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
        }
    )
    listed = control_plane.wait_for(
        lambda: control_plane.request("GET", f"/api/v1/namespaces/{ns}/configmaps", headers=as_alice),
        what="alice allowed after binding",
    )
    assert listed["kind"] == "ConfigMapList"
    with pytest.raises(KubeAPIError) as still_denied:
        control_plane.request("GET", "/api/v1/namespaces/default/configmaps", headers=as_alice)
    assert still_denied.value.status == 403


def test_deleted_namespace_disappears(control_plane: ControlPlane) -> None:
    ns = f"gone-{uuid.uuid4().hex[:6]}"
    control_plane.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    )
    control_plane.request(
        "POST",
        f"/api/v1/namespaces/{ns}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "b"}},
    )
    control_plane.request("DELETE", f"/api/v1/namespaces/{ns}")

    def gone() -> bool:
        try:
            control_plane.request("GET", f"/api/v1/namespaces/{ns}")
        except KubeAPIError as exc:
            return exc.status == 404
        return False

    control_plane.wait_for(gone, timeout=60, what="namespace deleted by the namespace controller")


def test_two_clusters_are_independent(control_plane_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = control_plane_factory("test"), control_plane_factory("other")
    assert a.server != b.server
    marker = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "only-in-a", "namespace": "default"},
    }
    a.apply(marker)
    with pytest.raises(KubeAPIError) as missing:
        b.request("GET", "/api/v1/namespaces/default/configmaps/only-in-a")
    assert missing.value.status == 404


def test_missing_binary_names_the_build_command(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("OTTERSCALE_TOOLS_DIR", str(tmp_path))
    with pytest.raises(ToolMissingError, match=r"nox -s tools -- kube-apiserver"):
        tool_path("kube-apiserver")


def test_no_orphans_after_the_test_process_is_killed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the process that started a cluster: its etcd and kube-apiserver must die too."""
    script = textwrap.dedent(
        f"""
        import pathlib, sys, time
        from otterscale.testing import start_control_plane
        cp = start_control_plane("orphan", pathlib.Path({str(tmp_path)!r}) / "c", controller_manager=False)
        print(" ".join(str(p.pid) for p in cp.processes), flush=True)
        time.sleep(600)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            pids = [int(p) for p in child.stdout.readline().split()]
            assert len(pids) == 2
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "control-plane processes outlived their parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent, the killed test process, is gone).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
