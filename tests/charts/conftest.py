"""Fixtures of the chart tests: the pinned helm binary (``helm_cli``) and a discovery-aware applier
(``kube``) for the session's real kube-apiserver."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from otterscale.testing import ControlPlane, KubeAPIError, ToolMissingError, tool_path

ROOT = Path(__file__).resolve().parents[2]
CHARTS = {name: ROOT / "charts" / name for name in ("otterscale-hub", "otterscale-agent")}
#: Every chart also renders with the Prometheus Operator API, so ServiceMonitors are checked.
API_VERSIONS = ("monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor")
FIELD_MANAGER = "otterscale-chart-tests"


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return tool_path("helm")
    except ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)


class Helm:
    """``helm template`` / ``helm lint`` with the pinned binary."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, check=False, timeout=120
        )

    def template(
        self,
        chart: str,
        *,
        values: Path | None = None,
        namespace: str = "otterscale",
        release: str = "test",
        sets: tuple[str, ...] = (),
        kubeconfig: Path | None = None,
    ) -> list[dict[str, Any]]:
        result = self.template_raw(
            chart, values=values, namespace=namespace, release=release, sets=sets, kubeconfig=kubeconfig
        )
        assert result.returncode == 0, f"helm template {chart} failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def template_raw(
        self,
        chart: str,
        *,
        values: Path | None = None,
        namespace: str = "otterscale",
        release: str = "test",
        sets: tuple[str, ...] = (),
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``kubeconfig``: render against that cluster (``--dry-run=server``), so ``lookup`` works."""
        args = ["template", release, str(CHARTS[chart]), "--namespace", namespace]
        if kubeconfig is not None:
            args += ["--dry-run=server", "--kubeconfig", str(kubeconfig)]
        for api in API_VERSIONS:
            args += ["--api-versions", api]
        if values is not None:
            args += ["--values", str(values)]
        for item in sets:
            args += ["--set", item]
        return self.run(*args)


@pytest.fixture(scope="session")
def helm_cli(helm: Path) -> Helm:
    return Helm(helm)


class Kube:
    """Paths of arbitrary objects from the API server's own discovery (plural, namespaced)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._resources: dict[str, list[dict[str, Any]]] = {}

    def resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if base not in self._resources:
            self._resources[base] = self.cp.request("GET", base)["resources"]
        for res in self._resources[base]:
            if res["kind"] == kind and "/" not in res["name"]:
                return res["name"], bool(res["namespaced"])
        raise LookupError(f"the API server does not serve {kind} in {api_version}")

    def path(self, obj: dict[str, Any], *, collection: bool = False) -> str:
        api_version = obj["apiVersion"]
        plural, namespaced = self.resource(api_version, obj["kind"])
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        meta = obj["metadata"]
        if namespaced:
            if not meta.get("namespace"):
                raise AssertionError(
                    f"{obj['kind']}/{meta['name']} is namespaced but the chart sets no namespace"
                )
            base = f"{base}/namespaces/{meta['namespace']}"
        base = f"{base}/{plural}"
        return base if collection else f"{base}/{meta['name']}"

    def apply(self, obj: dict[str, Any], *, dry_run: bool) -> Any:
        """Server-side apply; strict field validation (an unknown or misspelled field is an error)."""
        query = f"fieldManager={FIELD_MANAGER}&force=true&fieldValidation=Strict"
        if dry_run:
            query += "&dryRun=All"
        return self.cp.request(
            "PATCH", f"{self.path(obj)}?{query}", obj, content_type="application/apply-patch+yaml"
        )

    def ensure_namespace(self, name: str) -> None:
        self.cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def delete(self, obj: dict[str, Any]) -> None:
        try:
            self.cp.request("DELETE", self.path(obj))
        except KubeAPIError as exc:
            if exc.status != 404:
                raise


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Kube:
    return Kube(control_plane)
