"""The ``--provider`` option and the kind provider, as far as a machine without Docker allows
(``--provider=node`` runs for real in ``nox -s e2e -- --provider=node``; here only its refusal).

- Provider selection: ``local`` by default, ``kind`` on request, anything else refused.
- ``--provider=kind`` without a Docker engine or ``kind``: the run stops before any test, non-zero,
  saying what is missing.
- What the kind provider would run fits together: its helm releases (the deploy/kind values plus
  its ``--set``s) render with the pinned helm and every object passes a server-side dry-run on a
  real kube-apiserver; the agents' settings are the hub's; images, clusters and ports agree.
  (``tests/charts`` validates the deploy/kind value files alone; this covers the provider's argv.)
- Its building blocks that need no Docker: admin access from an embedded-credential kubeconfig,
  the TCP relay, the gateway issuer.
"""

from __future__ import annotations

import base64
import http.server
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from otterscale.testing import (
    ControlPlane,
    KubeAPIError,
    ToolMissingError,
    _kind,
    free_port,
    object_path,
    tool_path,
)

ROOT = Path(__file__).resolve().parents[2]
REALM_URL = "http://172.18.0.1:40123/realms/otterscale"


def _pytest(tmp_path: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Selection and the missing-Docker path


def test_local_is_the_default_and_kind_is_chosen_on_request(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import os\n"
        "def test_provider(request):\n"
        "    assert request.config.getoption('--provider') == os.environ['EXPECTED']\n"
    )
    os.environ["EXPECTED"] = "local"
    try:
        done = _pytest(tmp_path, str(probe), f"--rootdir={tmp_path}")
        assert done.returncode == 0, done.stdout + done.stderr
        refused = _pytest(tmp_path, str(probe), f"--rootdir={tmp_path}", "--provider=docker")
        assert refused.returncode == pytest.ExitCode.USAGE_ERROR
        assert "invalid choice: 'docker'" in refused.stderr
    finally:
        del os.environ["EXPECTED"]


@pytest.mark.parametrize("engine", ["no-docker", "engine-down"])
def test_kind_without_docker_or_kind_stops_at_once_saying_why(tmp_path: Path, engine: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if engine == "engine-down":  # what this machine has: a docker CLI, no engine, no kind
        docker = bin_dir / "docker"
        message = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
        docker.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
        docker.chmod(0o755)
    started = time.monotonic()
    done = _pytest(tmp_path, "tests/e2e", "--provider=kind", path=str(bin_dir))
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "--provider=kind cannot run here" in output
    assert "`kind` is not on PATH" in output
    if engine == "engine-down":
        assert "no Docker engine answers" in output
        assert "Cannot connect to the Docker daemon" in output
    else:
        assert "`docker` is not installed" in output
    assert not re.search(r"\d+ (passed|failed|error)", output), output  # no test ran
    assert time.monotonic() - started < 60


def test_node_where_it_cannot_run_stops_at_once_saying_why(tmp_path: Path) -> None:
    """No node tools and no images (an empty tools cache): exit 4 before any test, naming both."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["OTTERSCALE_TOOLS_DIR"] = str(tmp_path / "empty-cache")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/e2e", "--provider=node"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "--provider=node cannot run here" in output
    assert "not built: etcd, kube-apiserver" in output
    assert "nox -s tools -- etcd" in output
    assert "images not built: otterscale-hub, otterscale-agent (nox -s images)" in output
    assert not re.search(r"\d+ (passed|failed|error)", output), output


def test_preflight_is_empty_where_everything_is_there() -> None:
    def run(argv: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, "27.0.1\n", "")

    assert _kind.preflight(which=lambda name: f"/usr/bin/{name}", run=run) == []


# --------------------------------------------------------------------------------------------------
# The plan


@pytest.fixture(scope="module")
def plan() -> _kind.KindPlan:
    return _kind.KindPlan(_kind.repo_root(), realm_url=REALM_URL)


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return str(tool_path("helm"))
    except ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)


def _render(helm: str, release: _kind.Release) -> list[dict[str, Any]]:
    done = subprocess.run(
        release.template_argv(helm), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"helm template {release.name} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(doc for doc in docs if doc["kind"] == kind)


def test_the_plan_fits_together(plan: _kind.KindPlan) -> None:
    assert plan.root == ROOT
    for argv in plan.create_commands():
        config = Path(argv[argv.index("--config") + 1])
        assert config.is_file()
        assert yaml.safe_load(config.read_text())["kind"] == "Cluster"
    hub_cluster = yaml.safe_load((ROOT / "deploy/kind/hub-cluster.yaml").read_text())
    mapped = {(m["listenAddress"], m["hostPort"]) for m in hub_cluster["nodes"][0]["extraPortMappings"]}
    for url in (_kind.HUB_URL, _kind.TUNNEL_URL):
        host, port = url.removeprefix("http://").split(":")
        assert (host, int(port)) in mapped
    built = {argv[argv.index("--tag") + 1] for argv in plan.build_commands()}
    loaded = {argv[3] for argv in plan.load_commands()}
    assert built == loaded == {plan.image("otterscale-hub"), plan.image("otterscale-agent")}
    names = {argv[-1] for argv in plan.delete_commands()}
    assert names == {_kind.HUB_CLUSTER, *_kind.AGENT_CLUSTERS.values()}
    assert {r.kind_cluster for r in plan.releases()} == names
    assert sorted(plan.cluster_entries()) == ["east", "south", "west"]


@pytest.fixture(scope="module")
def kind_namespace(control_plane: ControlPlane) -> Iterator[str]:
    control_plane.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": _kind.NAMESPACE}})
    yield _kind.NAMESPACE
    control_plane.request("DELETE", f"/api/v1/namespaces/{_kind.NAMESPACE}")


def test_every_release_renders_and_passes_a_server_side_dry_run(
    plan: _kind.KindPlan, helm: str, control_plane: ControlPlane, kind_namespace: str
) -> None:
    refused = []
    for release in plan.releases():
        docs = _render(helm, release)
        image = plan.image("otterscale-hub" if release.name == "otterscale-hub" else "otterscale-agent")
        containers = _by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        assert {c["image"] for c in containers} == {image}
        assert {c["imagePullPolicy"] for c in containers} == {"Never"}  # the image kind loaded
        for doc in docs:
            if doc["kind"] == "ServiceMonitor":
                continue
            query = "?fieldManager=otterscale-kind-plan&force=true&fieldValidation=Strict&dryRun=All"
            try:
                control_plane.request(
                    "PATCH", object_path(doc) + query, doc, content_type="application/apply-patch+yaml"
                )
            except KubeAPIError as exc:
                refused.append(f"{release.context} {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not refused, "the API server refused:\n  " + "\n  ".join(refused)


def _secret_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    secret = _by_kind(docs, "Secret")
    data = {
        **secret.get("stringData", {}),
        **{k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()},
    }
    merged: dict[str, Any] = {}
    for text in data.values():
        loaded = yaml.safe_load(text)
        if isinstance(loaded, dict):
            merged.update(loaded)
    return merged


def test_the_agents_are_configured_as_the_hub_expects_them(plan: _kind.KindPlan, helm: str) -> None:
    hub_docs = _render(helm, plan.hub_release())
    hub_config = yaml.safe_load(next(iter(_by_kind(hub_docs, "ConfigMap")["data"].values())))
    assert hub_config["keycloak"]["realm_url"] == REALM_URL
    assert sorted(hub_config["clusters"]) == ["east", "south", "west"]
    hub_secret = yaml.dump(_secret_config(hub_docs))
    entries = plan.cluster_entries()
    for name, entry in entries.items():
        agent = hub_config["clusters"][name]["agent"]
        assert (agent["auth"]["user"], agent["tunnel_port"]) == (entry.user, entry.tunnel_port)
        assert entry.password in hub_secret
    for name in _kind.AGENT_CLUSTERS:
        docs = _render(helm, plan.agent_release(name))
        config = yaml.safe_load(next(iter(_by_kind(docs, "ConfigMap")["data"].values())))
        agent = config["clusters"][name]["agent"]
        assert (agent["auth"]["user"], agent["tunnel_port"]) == (
            entries[name].user,
            entries[name].tunnel_port,
        )
        assert entries[name].password in yaml.dump(_secret_config(docs))


# --------------------------------------------------------------------------------------------------
# Building blocks


def test_admin_access_from_an_embedded_kubeconfig(control_plane: ControlPlane, tmp_path: Path) -> None:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    cluster = {"server": control_plane.server, "certificate-authority-data": b64(control_plane.ca_file)}
    user = {
        "client-certificate-data": b64(control_plane.admin_cert),
        "client-key-data": b64(control_plane.admin_key),
    }
    kubeconfig = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
    )
    admin = _kind.admin_access("copy", kubeconfig, tmp_path / "copy")
    assert admin.request("GET", "/version")["major"] == "1"
    assert oct(admin.admin_key.stat().st_mode & 0o777) == "0o600"


def test_the_relay_forwards_both_ways() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    relay = _kind.TcpRelay(("127.0.0.1", port), ("127.0.0.1", server.server_address[1]))
    try:
        for _ in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/realms/x", timeout=5) as resp:
                assert resp.read() == b"/realms/x"
    finally:
        relay.close()
        server.shutdown()
        server.server_close()


def test_the_gateway_keycloak_issues_on_the_gateway(tmp_path: Path) -> None:
    kc = _kind.GatewayKeycloak(tmp_path, users=[], java_home=tmp_path, heap="64m", access_token_lifespan=60)
    kc.gateway, kc.port = "172.18.0.1", 40123
    assert kc.realm_url == REALM_URL
