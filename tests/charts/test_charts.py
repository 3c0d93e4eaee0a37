"""The Helm charts against helm itself and a real kube-apiserver.

For every value set (``charts/<chart>/ci/*.yaml`` and the kind values in ``deploy/kind/``):
``helm lint --strict``; ``helm template``; every rendered object server-side applied with
``dryRun=All`` and strict field validation, so the API server itself validates it (schemas,
immutable rules, CEL of the admission policy, unknown fields); and the rendered ConfigMap and
Secret merged exactly as the Pod's init container merges them, then loaded by the services' own
configuration loader. The RBAC is then exercised for real: the hub's ServiceAccount may take its
Lease and move the leader label and nothing else; the agent's may impersonate and read discovery
and nothing else.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from otterscale.common import load_config
from otterscale.testing import ControlPlane, KubeAPIError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KIND = ROOT / "deploy" / "kind"
CHART_NAMES = ("otterscale-hub", "otterscale-agent")
NAMESPACE = "otterscale-chart-tests"
#: A secret long enough for the charts and the services (at least 32 characters).
LONG = "a-chart-test-secret-0123456789abcdef"


@dataclass(frozen=True)
class ValueSet:
    chart: str
    values: Path

    @property
    def id(self) -> str:
        where = "kind" if self.values.parent == KIND else "ci"
        return f"{self.chart}:{where}/{self.values.stem}"


VALUE_SETS = [
    ValueSet(chart, values)
    for chart in CHART_NAMES
    for values in sorted((ROOT / "charts" / chart / "ci").glob("*.yaml"))
] + [
    ValueSet("otterscale-hub", KIND / "hub-values.yaml"),
    ValueSet("otterscale-agent", KIND / "agent-values.yaml"),
]

# Kinds each chart must always render, whatever the values.
ALWAYS = {
    "otterscale-hub": {"Deployment", "Service", "ConfigMap"},
    "otterscale-agent": {"Deployment", "ConfigMap"},
}

# The Prometheus Operator's duration pattern (monitoring.coreos.com/v1 Duration).
DURATION = "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
# A ServiceMonitor CRD with the fields the hub chart uses, typed as in the Prometheus Operator's
# (without x-kubernetes-preserve-unknown-fields, so a misspelled field is an error under strict
# validation instead of being silently pruned).
SERVICE_MONITOR_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": {
                                "type": "object",
                                "required": ["selector"],
                                "properties": {
                                    "jobLabel": {"type": "string"},
                                    "selector": {
                                        "type": "object",
                                        "properties": {
                                            "matchLabels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                        },
                                    },
                                    "namespaceSelector": {
                                        "type": "object",
                                        "properties": {
                                            "any": {"type": "boolean"},
                                            "matchNames": {"type": "array", "items": {"type": "string"}},
                                        },
                                    },
                                    "endpoints": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "port": {"type": "string"},
                                                "path": {"type": "string"},
                                                "scheme": {"type": "string", "enum": ["http", "https"]},
                                                "interval": {"type": "string", "pattern": DURATION},
                                                "scrapeTimeout": {"type": "string", "pattern": DURATION},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def service_monitor_crd(control_plane: ControlPlane) -> Iterator[None]:
    """The ServiceMonitor CRD, for this module only (the control plane is shared with other tests)."""
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/servicemonitors.monitoring.coreos.com"
    control_plane.apply(SERVICE_MONITOR_CRD)

    def established() -> bool:
        crd = control_plane.request("GET", path)
        conditions = (crd.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    control_plane.wait_for(established, what="ServiceMonitor CRD established")
    # Discovery of the new group is served shortly after the CRD is established.
    control_plane.wait_for(
        lambda: control_plane.request("GET", "/apis/monitoring.coreos.com/v1"),
        what="monitoring.coreos.com/v1 served",
    )
    yield
    control_plane.request("DELETE", path)


@pytest.fixture(scope="module")
def namespace(control_plane: ControlPlane, kube: Any) -> Iterator[str]:
    """The namespace the dry-runs target (it must exist even for a dry-run); deleted afterwards."""
    kube.ensure_namespace(NAMESPACE)
    yield NAMESPACE
    control_plane.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}")


# --------------------------------------------------------------------------------------------------
# helm lint and template


@pytest.mark.parametrize("case", VALUE_SETS, ids=lambda c: c.id)
def test_lint_strict(helm_cli: Any, case: ValueSet) -> None:
    result = helm_cli.run("lint", "--strict", "--values", str(case.values), str(ROOT / "charts" / case.chart))
    assert result.returncode == 0, f"helm lint --strict failed:\n{result.stdout}\n{result.stderr}"
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", VALUE_SETS, ids=lambda c: c.id)
def test_rendered_objects_pass_server_side_dry_run(
    helm_cli: Any, kube: Any, service_monitor_crd: None, namespace: str, case: ValueSet
) -> None:
    docs = helm_cli.template(case.chart, values=case.values, namespace=namespace)
    kinds = {doc["kind"] for doc in docs}
    assert ALWAYS[case.chart] <= kinds, f"missing {ALWAYS[case.chart] - kinds}"
    failures = []
    for doc in docs:
        try:
            applied = kube.apply(doc, dry_run=True)
        except (KubeAPIError, LookupError, AssertionError) as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
            continue
        assert applied["kind"] == doc["kind"]
    assert not failures, "the API server refused:\n  " + "\n  ".join(failures)


def test_value_sets_cover_the_optional_objects(helm_cli: Any) -> None:
    """Together the value sets render every optional object, so the dry-run sees all of them."""
    rendered: dict[str, set[str]] = {chart: set() for chart in CHART_NAMES}
    for case in VALUE_SETS:
        rendered[case.chart] |= {doc["kind"] for doc in helm_cli.template(case.chart, values=case.values)}
    assert rendered["otterscale-hub"] >= {
        "Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "Role", "RoleBinding",
        "PodDisruptionBudget", "ServiceMonitor", "NetworkPolicy", "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }  # fmt: skip
    assert rendered["otterscale-agent"] >= {
        "Deployment", "ConfigMap", "Secret", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "NetworkPolicy",
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The configuration the Pods will read


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((doc for doc in docs if doc["kind"] == kind), None)


def _existing_secret_overlay(chart: str, values: dict[str, Any]) -> str:
    """What an operator's Secret holds for the existing-secret value sets (as the values document)."""
    if chart == "otterscale-hub":
        clusters = {
            name: {"agent": {"auth": {"pass": f"{name}-password-from-an-operator-secret"}}}
            for name in values["config"]["clusters"]
        }
        return yaml.safe_dump({"clusters": clusters})
    agent = {
        "auth": {"pass": "agent-password-from-an-operator-secret"},
        "fingerprint": "k3tNNCbWyIqIG8qkN0J1v2dUcnS1xCYUqMqBo36fUKE=",
    }
    return yaml.safe_dump({"clusters": {values["cluster"]: {"agent": agent}}})


def _secret_values(overlay: Any) -> list[str]:
    """The key seeds and passwords in a secrets.yaml overlay."""
    if isinstance(overlay, dict):
        found = [v for k, v in overlay.items() if k in ("pass", "key_seed") and isinstance(v, str)]
        return found + [s for v in overlay.values() for s in _secret_values(v)]
    return []


@pytest.mark.parametrize("case", VALUE_SETS, ids=lambda c: c.id)
def test_merged_configuration_is_accepted_by_the_service(
    helm_cli: Any, tmp_path: Path, case: ValueSet
) -> None:
    """ConfigMap + Secret, merged by the init container's script, load with the service's own loader."""
    values = yaml.safe_load(case.values.read_text())
    docs = helm_cli.template(case.chart, values=case.values)
    configmap = _by_kind(docs, "ConfigMap")
    assert configmap is not None
    base = configmap["data"]["otterscale.yaml"]
    for secret_key in ("key_seed", "pass:", "password"):
        assert secret_key not in base, f"a secret ({secret_key}) leaked into the ConfigMap"
    secret = _by_kind(docs, "Secret")
    tunnel_key: bytes | None = None
    if secret is None:
        overlay = _existing_secret_overlay(case.chart, values)
        tunnel_key = b"-----BEGIN EC PRIVATE KEY-----\nx\n-----END EC PRIVATE KEY-----\n"
    else:
        overlay = base64.b64decode(secret["data"]["secrets.yaml"]).decode()
        if "tunnel.key" in secret["data"]:
            tunnel_key = base64.b64decode(secret["data"]["tunnel.key"])

    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "secrets.yaml").write_text(overlay)
    script = tmp_path / "merge-config.py"
    script.write_text(configmap["data"]["merge-config.py"])
    out = tmp_path / "otterscale.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(script),
            str(tmp_path / "base.yaml"),
            str(tmp_path / "secrets.yaml"),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "password" not in result.stdout
    for secret in _secret_values(yaml.safe_load(overlay)):
        assert secret not in result.stdout + result.stderr
    assert out.stat().st_mode & 0o777 == 0o600

    merged = yaml.safe_load(out.read_text())
    server = merged["tunnel"]["server"]
    if server.get("key_file") is not None:
        assert server["key_file"] == "/etc/otterscale/secret/tunnel.key"  # where the Deployment mounts it
        assert tunnel_key is not None
        key = tmp_path / "tunnel.key"
        key.write_bytes(tunnel_key)
        server["key_file"] = str(key)
        out.write_text(yaml.safe_dump(merged))

    if case.chart == "otterscale-hub":
        config = load_config(out, require_tunnel_key=True)
        assert set(config.clusters) == set(values["config"]["clusters"])
    else:
        config = load_config(out, require_tunnel_key=False)
        assert list(config.clusters) == [values["cluster"]]
        agent = config.clusters[values["cluster"]].agent
        assert agent.fingerprint, "the agent refuses to start without the hub's fingerprint"
        assert agent.auth.password.get_secret_value()


def test_secrets_not_given_are_generated_once_and_kept(
    helm_cli: Any, control_plane: ControlPlane, kube: Any
) -> None:
    """No tunnel key seed, no agent password in the values: the hub chart generates long random
    ones, and a later render against the cluster (as ``helm upgrade`` does) reads them back from
    the release's Secret instead of rolling new ones (which would change the hub's fingerprint and
    lock every agent out)."""
    values = ROOT / "charts" / "otterscale-hub" / "ci" / "default-values.yaml"
    namespace = f"hub-secrets-{uuid.uuid4().hex[:6]}"

    def generated(docs: list[dict[str, Any]]) -> dict[str, Any]:
        secret = _by_kind(docs, "Secret")
        assert secret is not None
        overlay: dict[str, Any] = yaml.safe_load(base64.b64decode(secret["data"]["secrets.yaml"]))
        return overlay

    first_docs = helm_cli.template("otterscale-hub", values=values, namespace=namespace, release="hub")
    first = generated(first_docs)
    seed = first["tunnel"]["server"]["key_seed"]
    password = first["clusters"]["dev"]["agent"]["auth"]["pass"]
    assert len(seed) >= 32
    assert len(password) >= 32
    assert seed != password
    # Without the cluster (helm template), nothing can be looked up: new values each time.
    again = generated(helm_cli.template("otterscale-hub", values=values, namespace=namespace, release="hub"))
    assert again["tunnel"]["server"]["key_seed"] != seed

    kube.ensure_namespace(namespace)
    secret = _by_kind(first_docs, "Secret")
    assert secret is not None
    try:
        kube.apply(secret, dry_run=False)  # as `helm install` would have created it
        kept = generated(
            helm_cli.template(
                "otterscale-hub",
                values=values,
                namespace=namespace,
                release="hub",
                kubeconfig=control_plane.kubeconfig,
            )
        )
        assert kept == first
        # A value given explicitly still wins over the stored one.
        given = generated(
            helm_cli.template(
                "otterscale-hub",
                values=values,
                namespace=namespace,
                release="hub",
                sets=(f"secrets.tunnelKeySeed={LONG}",),
                kubeconfig=control_plane.kubeconfig,
            )
        )
        assert given["tunnel"]["server"]["key_seed"] == LONG
        assert given["clusters"] == first["clusters"]
    finally:
        control_plane.request("DELETE", f"/api/v1/namespaces/{namespace}")


# --------------------------------------------------------------------------------------------------
# Refusals with a message that says what to do


@pytest.mark.parametrize(
    ("chart", "sets", "message"),
    [
        ("otterscale-hub", (), "config.keycloak.realm_url is required"),
        ("otterscale-agent", (), "cluster is required"),
        ("otterscale-agent", ("cluster=dev",), "secrets.password is required"),
        ("otterscale-agent", ("cluster=dev", f"secrets.password={LONG}"), "tunnelServerURL is required"),
    ],
)
def test_defaults_alone_fail_with_what_is_missing(
    helm_cli: Any, chart: str, sets: tuple[str, ...], message: str
) -> None:
    result = helm_cli.template_raw(chart, sets=sets)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    ("chart", "sets", "message"),
    [
        # secrets never go into the ConfigMap
        ("otterscale-hub", ("config.tunnel.server.key_seed=oops",), "'key_seed' not allowed"),
        ("otterscale-hub", ("config.clusters.dev.agent.auth.pass=oops",), "'pass' not allowed"),
        ("otterscale-agent", ("config.agent.auth.pass=oops",), "'pass' not allowed"),
        # a typo is refused, as the services refuse it
        ("otterscale-hub", ("config.keycloak.client_idd=x",), "'client_idd' not allowed"),
        (
            "otterscale-hub",
            ("replicaCount=2", "leaderElection.enabled=false"),
            "needs leaderElection.enabled",
        ),
        ("otterscale-hub", ("secrets.tunnelKey=abc", f"secrets.tunnelKeySeed={LONG}"), "exactly one of"),
        ("otterscale-hub", (f"secrets.agentPasswords.nope={LONG}",), "no such cluster"),
        # weak secrets (issue 13): at least 32 characters, or empty to have one generated
        ("otterscale-hub", ("secrets.tunnelKeySeed=change-me",), "minLength: got 9, want 32"),
        ("otterscale-hub", ("secrets.agentPasswords.dev=x",), "minLength: got 1, want 32"),
        ("otterscale-agent", ("secrets.password=dev-agent-password",), "minLength: got 18, want 32"),
        ("otterscale-agent", ("config.agent.fingerprint=",), "fingerprint is required"),
        ("otterscale-agent", ("tunnelServerURL=https://user:pw@hub.example.com",), "tunnelServerURL"),
    ],
)
def test_bad_values_are_refused(helm_cli: Any, chart: str, sets: tuple[str, ...], message: str) -> None:
    values = ROOT / "charts" / chart / "ci" / "default-values.yaml"
    result = helm_cli.template_raw(chart, values=values, sets=sets)
    assert result.returncode != 0, f"{sets} was accepted"
    assert message in result.stderr, result.stderr


def test_leader_election_follows_replicas(helm_cli: Any) -> None:
    values = ROOT / "charts" / "otterscale-hub" / "ci" / "default-values.yaml"

    def render(*sets: str) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
        docs = helm_cli.template("otterscale-hub", values=values, sets=sets)
        deployment = _by_kind(docs, "Deployment")
        tunnel = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-tunnel"))
        assert deployment is not None
        return deployment, tunnel, {d["kind"] for d in docs}

    single, tunnel, kinds = render()
    container = single["spec"]["template"]["spec"]["containers"][0]
    assert "--leader-elect" not in container["args"]
    assert "otterscale.io/leader" not in tunnel["spec"]["selector"]
    assert "Role" not in kinds
    assert "ValidatingAdmissionPolicy" not in kinds
    assert single["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

    ha, tunnel, kinds = render("replicaCount=3")
    container = ha["spec"]["template"]["spec"]["containers"][0]
    assert "--leader-elect" in container["args"]
    assert tunnel["spec"]["selector"]["otterscale.io/leader"] == "true"
    assert {"Role", "RoleBinding", "ValidatingAdmissionPolicy"} <= kinds
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"

    # A single replica may still opt in (e.g. to be ready for scaling out).
    _, tunnel, kinds = render("leaderElection.enabled=true")
    assert "Role" in kinds
    assert tunnel["spec"]["selector"]["otterscale.io/leader"] == "true"


def test_management_address_stays_on_loopback_unless_exposed(helm_cli: Any) -> None:
    """/metrics and the per-cluster health name every cluster: on the Pod IP (and a Service) only
    with management.expose or a ServiceMonitor, never on the API Service."""
    values = ROOT / "charts" / "otterscale-hub" / "ci" / "default-values.yaml"

    def render(*sets: str) -> tuple[list[str], list[str], list[str]]:
        docs = helm_cli.template("otterscale-hub", values=values, sets=sets)
        deployment = _by_kind(docs, "Deployment")
        assert deployment is not None
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        services = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
        return container["args"], [p["name"] for p in container["ports"]], services

    args, ports, services = render()
    assert not any(a.startswith("--management-address") for a in args)  # the hub's loopback default
    assert "management" not in ports
    assert not any(name.endswith("-management") for name in services)
    for sets in (("management.expose=true",), ("serviceMonitor.enabled=true",)):
        args, ports, services = render(*sets)
        assert "--management-address=:8298" in args, sets
        assert "management" in ports, sets
        assert any(name.endswith("-management") for name in services), sets


@pytest.mark.parametrize("case", VALUE_SETS, ids=lambda c: c.id)
def test_pods_are_locked_down(helm_cli: Any, case: ValueSet) -> None:
    deployment = _by_kind(helm_cli.template(case.chart, values=case.values), "Deployment")
    assert deployment is not None
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    main = pod["containers"][0]
    assert {"livenessProbe", "readinessProbe", "startupProbe", "resources"} <= set(main)
    expected = {"otterscale-hub": ("/livez", "/readyz"), "otterscale-agent": ("/ping", "/readyz")}[case.chart]
    assert (main["livenessProbe"]["httpGet"]["path"], main["readinessProbe"]["httpGet"]["path"]) == expected
    assert any(m["mountPath"] == "/tmp" for m in main["volumeMounts"])  # HOME and TMPDIR are writable


# --------------------------------------------------------------------------------------------------
# RBAC, for real


def _as(sa_namespace: str, sa_name: str) -> dict[str, str]:
    return {"Impersonate-User": f"system:serviceaccount:{sa_namespace}:{sa_name}"}


def _status(call: Any) -> int:
    try:
        call()
    except KubeAPIError as exc:
        return exc.status
    return 200


def _merge_patch(
    cp: ControlPlane, path: str, patch: dict[str, Any], headers: dict[str, str] | None = None
) -> Any:
    return cp.request("PATCH", path, patch, content_type="application/merge-patch+json", headers=headers)


def test_hub_service_account_can_lead_and_nothing_more(
    helm_cli: Any, kube: Any, control_plane: ControlPlane
) -> None:
    """The rendered Role, binding and admission policy, applied for real, against impersonated calls."""
    cp = control_plane
    namespace = f"hub-rbac-{uuid.uuid4().hex[:6]}"
    values = ROOT / "charts" / "otterscale-hub" / "ci" / "ha-values.yaml"
    docs = helm_cli.template("otterscale-hub", values=values, namespace=namespace, release="hub")
    wanted = {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    objects = [doc for doc in docs if doc["kind"] in wanted]
    assert {doc["kind"] for doc in objects} == wanted
    sa = next(doc["metadata"]["name"] for doc in objects if doc["kind"] == "ServiceAccount")
    as_hub = _as(namespace, sa)
    kube.ensure_namespace(namespace)
    for obj in objects:
        kube.apply(obj, dry_run=False)
    try:
        cp.wait_for(
            lambda: cp.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
            what="the namespace's default ServiceAccount",
        )
        pods = f"/api/v1/namespaces/{namespace}/pods"

        def make_pod(name: str) -> str:
            cp.request(
                "POST",
                pods,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "labels": {"app": "hub"}, "annotations": {"a": "b"}},
                    "spec": {"containers": [{"name": "c", "image": "registry.example/hub:1"}]},
                },
            )
            return f"{pods}/{name}"

        probe = make_pod("probe")
        pod = make_pod("hub-0")

        # The policy takes effect once the API server has compiled it: wait for a denial on a
        # throwaway Pod (never a fixed sleep).
        attempt = iter(range(10_000))

        def policy_active() -> bool:
            try:
                _merge_patch(cp, probe, {"metadata": {"labels": {"probe": str(next(attempt))}}}, as_hub)
            except KubeAPIError as exc:
                return exc.status in (403, 422) and "may change only" in str(exc.body)
            return False

        cp.wait_for(policy_active, timeout=30, what="the admission policy denies")

        # Leases: create the one Lease, read and renew it; nothing else.
        leases = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "otterscale-server-leader"},
            "spec": {"holderIdentity": "hub-0", "leaseDurationSeconds": 15},
        }
        cp.request("POST", leases, lease, headers=as_hub)
        current = cp.request("GET", f"{leases}/otterscale-server-leader", headers=as_hub)
        current["spec"]["holderIdentity"] = "hub-1"
        cp.request("PUT", f"{leases}/otterscale-server-leader", current, headers=as_hub)
        watch = f"{leases}?fieldSelector=metadata.name%3Dotterscale-server-leader"
        assert cp.request("GET", watch, headers=as_hub)["items"]
        cp.apply({**lease, "metadata": {"name": "other", "namespace": namespace}})
        assert _status(lambda: cp.request("GET", f"{leases}/other", headers=as_hub)) == 403
        assert _status(lambda: cp.request("GET", leases, headers=as_hub)) == 403
        assert (
            _status(lambda: cp.request("DELETE", f"{leases}/otterscale-server-leader", headers=as_hub)) == 403
        )

        # Pods: read them; move the leader label; touch nothing else.
        assert cp.request("GET", pods, headers=as_hub)["items"]
        _merge_patch(cp, pod, {"metadata": {"labels": {"otterscale.io/leader": "true"}}}, as_hub)
        assert cp.request("GET", pod)["metadata"]["labels"]["otterscale.io/leader"] == "true"
        _merge_patch(cp, pod, {"metadata": {"labels": {"otterscale.io/leader": None}}}, as_hub)
        assert "otterscale.io/leader" not in cp.request("GET", pod)["metadata"]["labels"]
        denied = [
            {"metadata": {"labels": {"app": "evil"}}},
            {"metadata": {"labels": {"otterscale.io/leader": "false"}}},
            {"metadata": {"labels": {"app": None}}},
            {"metadata": {"annotations": {"a": "c"}}},
            {"metadata": {"finalizers": ["example.com/block"]}},
            {"spec": {"containers": [{"name": "c", "image": "registry.example/evil:1"}]}},
        ]
        for patch in denied:
            with pytest.raises(KubeAPIError) as refused:
                cp.request(
                    "PATCH", pod, patch, content_type="application/strategic-merge-patch+json", headers=as_hub
                )
            # Refused by the chart's admission policy, not by Pod validation.
            assert "ValidatingAdmissionPolicy" in str(refused.value.body), (patch, refused.value.body)
        assert cp.request("GET", pod)["spec"]["containers"][0]["image"] == "registry.example/hub:1"
        assert _status(lambda: cp.request("DELETE", pod, headers=as_hub)) == 403
        assert (
            _status(lambda: cp.request("GET", f"/api/v1/namespaces/{namespace}/secrets", headers=as_hub))
            == 403
        )
        assert _status(lambda: cp.request("GET", "/api/v1/namespaces/default/pods", headers=as_hub)) == 403
        # Anyone else is not affected by the policy.
        _merge_patch(cp, pod, {"metadata": {"labels": {"app": "other"}}})
    finally:
        for obj in objects:
            if "namespace" not in obj["metadata"] or obj["kind"].startswith("ValidatingAdmission"):
                kube.delete(obj)
        cp.request("DELETE", f"/api/v1/namespaces/{namespace}")


def _can(cp: ControlPlane, user: str, attributes: dict[str, Any]) -> bool:
    review = cp.request(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", "system:authenticated"],
                **attributes,
            },
        },
    )
    return bool(review["status"].get("allowed"))


@pytest.mark.parametrize(
    ("values_name", "restricted"), [("default-values.yaml", False), ("existing-secret-values.yaml", True)]
)
def test_agent_service_account_can_impersonate_and_discover_only(
    helm_cli: Any, kube: Any, control_plane: ControlPlane, values_name: str, restricted: bool
) -> None:
    cp = control_plane
    namespace = f"agent-rbac-{uuid.uuid4().hex[:6]}"
    values = ROOT / "charts" / "otterscale-agent" / "ci" / values_name
    docs = helm_cli.template("otterscale-agent", values=values, namespace=namespace, release="agent")
    objects = [doc for doc in docs if doc["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert len(objects) == 2
    sa = next(doc["metadata"]["name"] for doc in docs if doc["kind"] == "ServiceAccount")
    user = f"system:serviceaccount:{namespace}:{sa}"
    for obj in objects:
        kube.apply(obj, dry_run=False)
    try:

        def impersonate(resource: str, name: str = "") -> dict[str, Any]:
            return {
                "resourceAttributes": {"verb": "impersonate", "group": "", "resource": resource, "name": name}
            }

        def non_resource(path: str, verb: str = "get") -> dict[str, Any]:
            return {"nonResourceAttributes": {"path": path, "verb": verb}}

        # RBAC changes reach the authorizer through an informer: wait for the first grant.
        cp.wait_for(lambda: _can(cp, user, non_resource("/apis")), what="the agent's ClusterRole in effect")
        for path in (
            "/api",
            "/api/v1",
            "/apis",
            "/apis/apps/v1",
            "/openapi/v3",
            "/openapi/v3/apis/apps/v1",
            "/version",
        ):
            assert _can(cp, user, non_resource(path)), path
        assert not _can(cp, user, non_resource("/apis", "post"))
        assert not _can(cp, user, non_resource("/metrics"))
        assert not _can(cp, user, non_resource("/logs/"))
        assert _can(cp, user, impersonate("users", "alice"))
        assert _can(cp, user, impersonate("groups", "developers"))
        assert _can(cp, user, impersonate("groups", "system:authenticated"))
        assert _can(cp, user, impersonate("groups", "system:masters")) is not restricted
        for resource in ("serviceaccounts", "userextras/scopes", "uids"):
            assert not _can(cp, user, impersonate(resource, "x")), resource
        for verb, resource in (("list", "pods"), ("get", "secrets"), ("create", "pods"), ("list", "nodes")):
            attributes = {"resourceAttributes": {"verb": verb, "group": "", "resource": resource}}
            assert not _can(cp, user, attributes), (verb, resource)
    finally:
        for obj in objects:
            kube.delete(obj)


# --------------------------------------------------------------------------------------------------
# The kind e2e files


def test_kind_files_fit_together(helm_cli: Any, tmp_path: Path) -> None:
    hub_cluster = yaml.safe_load((KIND / "hub-cluster.yaml").read_text())
    agent_cluster = yaml.safe_load((KIND / "agent-cluster.yaml").read_text())
    for cluster in (hub_cluster, agent_cluster):
        assert cluster["kind"] == "Cluster"
        assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
        assert [node["role"] for node in cluster["nodes"]] == ["control-plane"]
    hub = yaml.safe_load((KIND / "hub-values.yaml").read_text())
    agent = yaml.safe_load((KIND / "agent-values.yaml").read_text())
    mapped = {m["containerPort"] for m in hub_cluster["nodes"][0]["extraPortMappings"]}
    assert {hub["service"]["nodePort"], hub["tunnelService"]["nodePort"]} <= mapped
    assert agent["tunnelServerURL"].endswith(f":{hub['tunnelService']['nodePort']}")
    east = hub["config"]["clusters"][agent["cluster"]]["agent"]
    assert agent["config"]["agent"]["auth"]["user"] == east["auth"]["user"]
    assert agent["config"]["agent"]["tunnel_port"] == east["tunnel_port"]
    assert agent["secrets"]["password"] == hub["secrets"]["agentPasswords"][agent["cluster"]]


def test_kind_agent_fingerprint_is_that_of_the_hub_seed(tmp_path: Path) -> None:
    """The fingerprint in agent-values.yaml is what the real chisel derives from hub-values' seed."""
    from otterscale.testing import ManagedProcess, free_port, tool_path

    seed = yaml.safe_load((KIND / "hub-values.yaml").read_text())["secrets"]["tunnelKeySeed"]
    expected = yaml.safe_load((KIND / "agent-values.yaml").read_text())["config"]["agent"]["fingerprint"]
    log = tmp_path / "chisel.log"
    chisel = ManagedProcess(
        "chisel-fingerprint",
        [str(tool_path("chisel")), "server", "--host", "127.0.0.1", "--port", str(free_port()), "--reverse"],
        log,
        env={"CHISEL_KEY": seed},
    )
    try:
        chisel.wait_until(lambda: "Fingerprint" in log.read_text(), timeout=20, what="fingerprint logged")
    finally:
        chisel.stop()
    line = next(line for line in log.read_text().splitlines() if "Fingerprint" in line)
    assert line.split("Fingerprint", 1)[1].strip() == expected
