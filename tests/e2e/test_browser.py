"""A real browser calls the hub from another origin, as a dashboard does (issue 15).

Debian's Chromium (``apt-get install chromium``), driven by playwright-core from npm (no browser
download), opens the page of ``web/dashboard-test``: built here with ``@connectrpc/connect-web``
and a TypeScript client generated from ``packages/proto/proto`` at build time, served by a static
server on its own loopback port, so its origin is not the hub's. The hub (a process) allows that
origin in its ``cors`` section; a second static server serves the same page from an origin the
hub does not allow.

Against a real system (Keycloak token for alice, the hub and an agent as processes, a real
control plane, real chisel), over the Connect transport (JSON and binary) and the gRPC-Web
transport (binary and JSON), the page performs ListClusters, Discovery, List, Apply, Get, Watch
(a change made after the Watch started arrives as MODIFIED), the fleet view (MultiList paged two
items at a time and MultiWatch, over the live cluster and a configured one without an agent, each
with its own outcome), Describe, Delete, and a call without a token that must show
``unauthenticated``. On a third cluster, the real test node (``node`` fixture), it does what a
dashboard's pod and workload views do: PodLog follow (new lines arrive), an exec of ``cat`` that
echoes what the page wrote (two writes sent out of order, applied by offset, then stdin closed:
exit code 0), Scale and Restart of a Deployment. From the disallowed origin the browser must
block the answer: the page sees a network error, not a response.

Describe comes with another part of issue 15 (resource.proto gains the RPC). The page looks it up
in the client generated from the .proto files; until it is there its row says "waiting" and this
test requires exactly that. Once resource.proto has Describe, the row must be "ok".

Artifacts (results.json, screenshots, the table) go to ``results/browser-<time>/``; the path and
the transport x RPC table are printed and shown in the e2e measurements summary.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otterscale.testing import ControlPlane, Keycloak, Node, System, start_system

from .conftest import ISSUED_TOKENS, Measurements, secrets_in, subject_of, unique

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.node]

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web" / "dashboard-test"
RESOURCE_PROTO = ROOT / "packages/proto/proto/otterscale/resource/v1/resource.proto"
#: Debian's package (`apt-get install -y chromium`); .ci/run installs it.
CHROMIUM = Path("/usr/bin/chromium")
TRANSPORTS = ("connect-json", "connect-binary", "grpc-web-binary", "grpc-web-json")
RPCS = (
    "ListClusters",
    "Discovery",
    "List",
    "Apply",
    "Get",
    "Watch",
    "MultiList",
    "MultiWatch",
    "Describe",
    "Delete",
    "PodLog",
    "Exec",
    "Scale",
    "Restart",
    "Unauthenticated",
)
CLUSTER = "browser"
#: Configured, with no agent: the fleet-wide calls show its own outcome (UNAVAILABLE) beside the
#: live cluster's.
DOWN_CLUSTER = "browser-down"
#: The cluster of the runtime steps: the real test node (Pods run there).
RUNTIME_CLUSTER = "browser-node"
#: A container printing a line every 0.2 s, and one that idles (for `cat`).
TICKER = ["python3", "-u", "-c", "import time\nn=0\nwhile True:\n print('tick', n); n+=1; time.sleep(0.2)"]
SLEEPER = ["python3", "-c", "import time\nwhile True: time.sleep(3600)"]
#: Per call, in the page. Generous: a loaded 2-core machine, and the first call also warms up the
#: agent's discovery cache.
CALL_TIMEOUT_MS = 60_000
#: The whole browser run: 4 transports x 11 steps, each bounded above (a run takes about 10 s).
DRIVE_TIMEOUT_S = 600


def _run(command: list[str], what: str, timeout: float) -> None:
    done = subprocess.run(
        command,
        cwd=WEB,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


@pytest.fixture(scope="session")
def dashboard_page() -> Path:
    """``web/dashboard-test/dist``: npm packages installed (``npm ci``), client generated, bundled."""
    for tool, hint in (("node", "install Node.js 20+"), ("npm", "install npm")):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is not installed ({hint}); the browser test builds its page with it")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get update && apt-get install -y chromium`", pytrace=False)
    installed = WEB / "node_modules" / ".package-lock.json"
    lock = WEB / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        _run(["npm", "ci", "--no-audit", "--no-fund"], "installing the page's npm packages", 600)
    _run(["npm", "run", "build"], "building the page", 300)
    return WEB / "dist"


class StaticSite:
    """The built page over HTTP on a loopback port of its own (so an origin of its own)."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="static-site", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def sites(dashboard_page: Path) -> Iterator[tuple[StaticSite, StaticSite]]:
    """The page from an origin the hub allows, and from one it does not."""
    allowed, refused = StaticSite(dashboard_page), StaticSite(dashboard_page)
    try:
        yield allowed, refused
    finally:
        allowed.stop()
        refused.stop()


@pytest.fixture(scope="session")
def browser_system(
    tmp_path_factory: pytest.TempPathFactory,
    control_plane_factory: Any,
    node: Node,
    keycloak: Keycloak,
    sites: tuple[StaticSite, StaticSite],
) -> Iterator[System]:
    """A hub (``cors.allowed_origins``: the allowed site) and an agent for cluster ``browser``.

    Its own hub, so the shared e2e system's configuration stays as it is; the control plane is
    the shared ``east`` one (another agent on it, as a second hub would have).
    """
    cp: ControlPlane = control_plane_factory("east")
    system = start_system(
        tmp_path_factory.mktemp("browser-system"),
        {CLUSTER: cp, DOWN_CLUSTER: None, RUNTIME_CLUSTER: node.control_plane},
        realm_url=keycloak.realm_url,
        client_id=keycloak.client_id,
        extra_config={"cors": {"allowed_origins": [sites[0].origin]}},
    )
    try:
        yield system
    finally:
        system.stop()


def _grant(cp: ControlPlane, namespace: str, subject: str) -> None:
    """What a dashboard user has: edit ConfigMaps and read Events in one namespace."""
    cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "dashboard", "namespace": namespace},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]},
                {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]},
            ],
        }
    )
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "dashboard", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dashboard"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": subject}],
        }
    )


def _runtime_targets(node: Node, namespace: str, subject: str) -> dict[str, str]:
    """Pods and a Deployment on the node, and what a dashboard user may do with them there:
    read logs, exec, scale and restart in one namespace."""
    cp = node.control_plane
    cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    cp.wait_for(
        lambda: cp.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default"), 60, "sa"
    )
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "dashboard", "namespace": namespace},
            "rules": [
                {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["get", "create"]},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]},
                {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "update"]},
            ],
        }
    )
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "dashboard", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dashboard"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": subject}],
        }
    )
    image = node.image("python")
    targets = {"logPod": unique("ticker"), "shellPod": unique("shell"), "deployment": unique("web")}
    node.run_pod(targets["logPod"], image, TICKER, namespace=namespace, wait=False)
    node.run_pod(targets["shellPod"], image, SLEEPER, namespace=namespace, wait=False)
    labels = {"app": targets["deployment"]}
    cp.request(
        "POST",
        f"/apis/apps/v1/namespaces/{namespace}/deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": targets["deployment"]},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {"name": "app", "image": image, "imagePullPolicy": "Never", "command": SLEEPER}
                        ]
                    },
                },
            },
        },
    )
    for pod in (targets["logPod"], targets["shellPod"]):
        node.wait_pod_ready(namespace, pod)
    return {"cluster": RUNTIME_CLUSTER, "namespace": namespace, **targets}


def _describe_in_proto() -> bool:
    return re.search(r"^\s*rpc\s+Describe\s*\(", RESOURCE_PROTO.read_text(), re.M) is not None


def _table(runs: dict[str, list[dict[str, Any]]], blocked: dict[str, list[dict[str, Any]]]) -> str:
    mark = {"ok": "ok", "failed": "FAILED", "waiting": "waiting"}
    lines = ["| RPC | " + " | ".join(TRANSPORTS) + " |", "|---" * (len(TRANSPORTS) + 1) + "|"]
    for rpc in RPCS:
        cells = []
        for transport in TRANSPORTS:
            row = next((s for s in runs.get(transport, []) if s["rpc"] == rpc), None)
            cells.append("-" if row is None else f"{mark[row['outcome']]} ({row['ms']} ms)")
        lines.append(f"| {rpc} | " + " | ".join(cells) + " |")
    cells = []
    for transport in TRANSPORTS:
        row = (blocked.get(transport) or [{}])[0]
        shown = (
            "blocked" if row.get("outcome") == "failed" and row.get("code") == "unknown" else "NOT blocked"
        )
        cells.append(f"{shown} ({row.get('code', '?')})")
    lines.append("| ListClusters from a disallowed origin | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Set-up included (pytest-timeout counts fixtures): alone, this test starts Keycloak, a control
# plane, the test node (and Pods on it), a hub and two agents and builds the page first; 300 s is
# too tight for that on 2 busy cores.
@pytest.mark.timeout(DRIVE_TIMEOUT_S + 600)
def test_a_dashboard_in_chromium_calls_the_hub_from_another_origin(
    browser_system: System,
    sites: tuple[StaticSite, StaticSite],
    keycloak: Keycloak,
    node: Node,
    measurements: Measurements,
    tmp_path: Path,
) -> None:
    allowed, refused = sites
    cp = browser_system.clusters[CLUSTER].control_plane
    assert cp is not None
    token = keycloak.token("alice")
    ISSUED_TOKENS.add(token)
    namespace = unique("browser")
    _grant(cp, namespace, subject_of(token))
    runtime = _runtime_targets(node, namespace, subject_of(token))

    artifacts = ROOT / "results" / time.strftime("browser-%Y%m%d-%H%M%S")
    artifacts.mkdir(parents=True, exist_ok=True)
    token_file = tmp_path / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    config = {
        "chromium": str(CHROMIUM),
        "userDataDir": str(tmp_path / "chromium-profile"),  # fresh for every run
        "allowedPage": f"{allowed.origin}/index.html",
        "blockedPage": f"{refused.origin}/index.html",
        "hubUrl": browser_system.hub_url,
        "tokenFile": str(token_file),
        "cluster": CLUSTER,
        "downCluster": DOWN_CLUSTER,
        "namespace": namespace,
        "timeoutMs": CALL_TIMEOUT_MS,
        "transports": list(TRANSPORTS),
        "runtime": runtime,
        "artifacts": str(artifacts),
    }
    config_file = tmp_path / "drive.json"
    config_file.write_text(json.dumps(config))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HTTP_PROXY", "HTTPS_PROXY", "http_proxy"))
    }
    done = subprocess.run(
        ["node", "drive.mjs", str(config_file)],
        cwd=WEB,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DRIVE_TIMEOUT_S,
        check=False,
    )
    print(done.stdout)
    assert done.returncode == 0, f"the browser could not be driven:\n{done.stdout}\n{done.stderr[-4000:]}"
    results_text = (artifacts / "results.json").read_text()
    assert token not in results_text
    assert token.rsplit(".", 1)[1] not in results_text
    results = json.loads(results_text)
    table = _table(results["runs"], results["blocked"])
    (artifacts / "table.md").write_text(f"{results['browser']}\n\n{table}\n")
    print(f"\nbrowser: {results['browser']}\nartifacts: {artifacts}\n{table}")
    measurements.record(
        "browser",
        {"artifacts": str(artifacts), "browser": results["browser"], "table": table.splitlines()},
    )

    assert "Chrome/" in results["browser"]
    describe_expected = "ok" if _describe_in_proto() else "waiting"
    for transport in TRANSPORTS:
        steps = {step["rpc"]: step for step in results["runs"][transport]}
        assert list(steps) == list(RPCS), transport
        for rpc, step in steps.items():
            expected = describe_expected if rpc == "Describe" else "ok"
            assert step["outcome"] == expected, f"{transport} {rpc}: {step}"
        assert steps["Watch"]["detail"].startswith("MODIFIED at resourceVersion"), steps["Watch"]
        assert steps["PodLog"]["detail"].startswith("followed: tick "), steps["PodLog"]
        assert steps["Exec"]["detail"] == 'echoed "hello world", exit code 0', steps["Exec"]
        assert steps["MultiList"]["detail"].endswith(f"{CLUSTER} OK, {DOWN_CLUSTER} UNAVAILABLE"), steps
        assert steps["MultiWatch"]["detail"].startswith(f"MODIFIED from {CLUSTER}"), steps["MultiWatch"]
        assert steps["Unauthenticated"]["detail"].startswith("unauthenticated: "), steps["Unauthenticated"]

    # From the disallowed origin: a network error, not the hub's answer. connect-web reports a
    # failed fetch as code unknown; Chromium says why on the console, and the hub says in its
    # debug log that it answered that origin's preflight without CORS headers.
    for transport in TRANSPORTS:
        [step] = results["blocked"][transport]
        assert (step["outcome"], step["code"]) == ("failed", "unknown"), f"{transport}: {step}"
        assert "Failed to fetch" in step["detail"], step
    blocked_console = [line["text"] for line in results["console"] if line["page"].startswith(refused.origin)]
    assert any(
        f"from origin '{refused.origin}' has been blocked by CORS policy" in text for text in blocked_console
    ), blocked_console
    assert not [
        line
        for line in results["console"]
        if line["page"].startswith(allowed.origin) and "CORS" in line["text"]
    ]
    hub_log = browser_system.hub_log.read_text()
    assert f"preflight from '{refused.origin}' answered without CORS headers: origin not allowed" in hub_log

    leaked = secrets_in(browser_system.logs(), {"alice's token": token})
    assert not leaked, leaked
    assert (artifacts / "allowed.png").stat().st_size > 0
    assert (artifacts / "blocked.png").stat().st_size > 0
