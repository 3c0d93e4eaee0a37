"""The test node itself: Pods from local images run under the charts' security settings, the
network is what the module says it is, and stopping (or killing the process that started it)
leaves the host exactly as it was.

Real everything: the kubelet, containerd, runc, CNI, kube-proxy and CoreDNS of
``otterscale.testing._node``, and the Python base image of ``nox -s images``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from otterscale.testing import Node, _footprint, _node

pytestmark = [pytest.mark.integration, pytest.mark.node]


def _python(node: Node, name: str, code: str, *, namespace: str = "default") -> dict[str, Any]:
    """A Pod running ``python3 -c code`` in the Python base image, Ready once it runs."""
    return node.run_pod(name, node.image("python"), ["python3", "-c", code], namespace=namespace)


def _wait_log(node: Node, name: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = node.pod_log("default", name)
        if re.search(pattern, text):
            return text
        assert time.monotonic() < deadline, f"{pattern!r} not in the log of {name}:\n{text}"
        time.sleep(0.2)


def _delete(node: Node, name: str) -> None:
    node.control_plane.request("DELETE", f"/api/v1/namespaces/default/pods/{name}?gracePeriodSeconds=0")


def test_a_pod_from_a_local_image_runs_locked_down_and_logs(node: Node) -> None:
    code = textwrap.dedent(
        """
        import os, socket, time
        print("uid", os.getuid(), "gid", os.getgid(), flush=True)
        try:
            open("/written", "w")
            print("root writable", flush=True)
        except OSError as exc:
            print("root read-only:", exc.strerror, flush=True)
        print("caps", open("/proc/self/status").read().split("CapEff:")[1].split()[0], flush=True)
        print("resolved", socket.gethostbyname("kubernetes.default.svc.cluster.local"), flush=True)
        time.sleep(3600)
        """
    )
    pod = _python(node, "locked-down", code)
    try:
        assert pod["status"]["podIP"].startswith("10.244.")
        log = _wait_log(node, "locked-down", r"resolved ")
        assert "uid 65532 gid 65532" in log
        assert "root read-only: Read-only file system" in log
        assert "caps 0000000000000000" in log
        # CoreDNS answers for the cluster's own names.
        assert f"resolved {node.layout.kubernetes_service_ip}" in log
    finally:
        _delete(node, "locked-down")


def test_pods_reach_the_host_side_and_the_host_reaches_services(node: Node, tmp_path: Path) -> None:
    """A server bound on the host's end of the veth answers a Pod; a NodePort and a ClusterIP answer
    the host. (How Keycloak and other clusters' API servers are reached from Pods.)"""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"host saw {self.client_address[0]}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((node.host_ip, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    code = textwrap.dedent(
        f"""
        import http.server, urllib.request, time
        print(urllib.request.urlopen("http://{node.host_ip}:{port}/", timeout=10).read().decode(), flush=True)
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.send_header("Content-Length", "4"); self.end_headers()
                self.wfile.write(b"pong")
            def log_message(self, *a): pass
        http.server.HTTPServer(("", 8080), H).serve_forever()
        """
    )
    try:
        pod = _python(node, "web", code)
        log = _wait_log(node, "web", r"host saw ")
        assert f"host saw {pod['status']['podIP']}" in log  # no masquerade: the Pod's own address
        service = node.control_plane.request(
            "POST",
            "/api/v1/namespaces/default/services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {
                    "type": "NodePort",
                    "selector": {"app": "web"},
                    "ports": [{"port": 80, "targetPort": 8080}],
                },
            },
        )
        import urllib.request

        urls = [
            f"http://{service['spec']['clusterIP']}/",
            f"http://{node.node_ip}:{service['spec']['ports'][0]['nodePort']}/",
        ]
        for url in urls:
            deadline = time.monotonic() + 30  # kube-proxy writes the rules a moment after the Service
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - the node
                        assert resp.read() == b"pong"
                        break
                except OSError:
                    assert time.monotonic() < deadline, f"{url} did not answer"
                    time.sleep(0.2)
        # Nothing the node sends is forwarded beyond the host.
        assert Path(f"/proc/sys/net/ipv4/conf/{node.layout.host_veth}/forwarding").read_text().strip() == "0"
    finally:
        server.shutdown()
        server.server_close()
        node.control_plane.request("DELETE", "/api/v1/namespaces/default/services/web")
        _delete(node, "web")


# --------------------------------------------------------------------------------------------------
# Teardown: nothing is left on the host


def host_iptables() -> list[str]:
    """The host's own rules (the node's live in its namespace and must never show here)."""
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if not line.startswith(("#", ":"))]


def marks_of(footprint: _footprint.Footprint) -> tuple[set[str], set[str], list[str]]:
    """A running node's Pod sandboxes and network namespaces, and what it has on the host now."""
    sandboxes = _footprint.sandbox_ids(footprint)
    netns = _footprint.pod_netns(footprint, sandboxes)
    return sandboxes, netns, _footprint.remaining(footprint, sandboxes, netns)


def _wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _sleeper(node: Node) -> None:
    node.run_pod("sleeper", node.image("python"), ["python3", "-c", "import time; time.sleep(3600)"])


def test_stop_leaves_the_host_as_it_was(node: Node, tmp_path: Path) -> None:
    """A second node (its own index and addresses) with a running Pod, then stopped: none of its
    processes, mounts, namespaces, links, cgroups, CNI results or log links is left, the kernel
    settings are back, and the host's iptables rules were never touched."""
    rules = host_iptables()
    second = _node.start_node(tmp_path / "second", coredns=False)
    try:
        assert second.layout.index != node.layout.index
        assert second.footprint.sysctls  # recorded before the kubelet changed them
        _sleeper(second)
        sandboxes, netns, marks = marks_of(second.footprint)
        assert sandboxes
        assert netns
        for expected in ("process", "mount", "network namespace", "link", "cgroup", "CNI result", "log link"):
            assert any(mark.startswith(expected) for mark in marks), (expected, marks)
    finally:
        errors = second.stop()
    assert errors == []
    assert _footprint.remaining(second.footprint, sandboxes, netns) == []
    assert host_iptables() == rules
    assert node.control_plane.request("GET", f"/api/v1/nodes/{node.name}")  # the session's node is untouched


_STARTER = """
import sys, time
from pathlib import Path
from otterscale.testing import _node
node = _node.start_node(Path(sys.argv[1]), coredns=False, progress=lambda m: None)
node.run_pod("sleeper", node.image("python"), ["python3", "-c", "import time; time.sleep(3600)"])
print(node.keeper.pid, flush=True)
time.sleep(3600)
"""


def test_a_killed_starter_leaves_nothing_behind(node: Node, tmp_path: Path) -> None:
    """SIGKILL the process that started a node (no cleanup code of its own runs): its keeper
    removes the node's processes, containers, mounts, network, cgroups and kernel settings."""
    rules = host_iptables()
    directory = tmp_path / "killed"
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stdout is not None
        keeper_pid = int(starter.stdout.readline() or 0)
        assert keeper_pid, starter.stderr.read() if starter.stderr else ""
        footprint = _footprint.Footprint.load(directory)
        sandboxes, netns, marks = marks_of(footprint)
        assert any(mark.startswith("cgroup") for mark in marks), marks
        starter.send_signal(signal.SIGKILL)
        _wait_for(lambda: not Path(f"/proc/{keeper_pid}").exists(), 120, "the keeper did not finish")
    finally:
        if starter.poll() is None:
            starter.kill()
        starter.communicate(timeout=30)  # reaps it and closes the pipes
    keeper_log = (directory / "log" / "keeper.log").read_text()
    assert "cleaning up the node" in keeper_log
    assert "not undone" not in keeper_log, keeper_log
    assert _footprint.remaining(footprint, sandboxes, netns) == []
    assert host_iptables() == rules


def test_where_the_node_cannot_run_it_says_what_is_missing(tmp_path: Path) -> None:
    env = {**os.environ, "OTTERSCALE_TOOLS_DIR": str(tmp_path / "no-tools")}
    done = subprocess.run(
        [sys.executable, "-c", "from otterscale.testing import _node; print(_node.preflight())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "not built: etcd, kube-apiserver, kube-controller-manager, kubelet" in done.stdout
    assert "nox -s tools -- etcd kube-apiserver" in done.stdout
    assert json.dumps(_node.preflight()) == "[]"  # and this machine has all of it
