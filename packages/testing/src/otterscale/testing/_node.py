"""A real single-node Kubernetes cluster made of processes, for tests that need running Pods.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the kubelet and kube-proxy
(iptables mode) from the tools cache (``nox -s tools -- node``), with a containerd of its own
(Debian's containerd, runc and CNI plugins; its own socket, root and state, never the system's),
a bridge CNI network and CoreDNS. Every process runs in the node's network namespace
(``otsnode<i>``), linked to the host by a veth pair:

- the node is ``10.250.<i>.1`` (API server on 6443, kubelet, NodePorts), the host's end is
  ``10.250.<i>.254``: Pods reach services the tests run on the host there (Keycloak, other
  clusters' API servers, through :class:`~otterscale.testing._kind.TcpRelay`);
- the host routes the Pod range ``10.244.<i>.0/24`` and the Service range ``10.(96+i).0.0/16`` to
  the node, so tests reach Pods, ClusterIPs and NodePorts directly;
- the host's end has forwarding off: whatever a Pod sends reaches the host's own addresses only,
  never beyond (and nothing is masqueraded). All iptables rules live in the node's namespace.

No registry: images are imported into the node's containerd from archives (:meth:`Node.image`):
pause and CoreDNS are made here from their binaries, the project's images and the Python base
come from ``nox -s images`` (``images.json`` in the images cache). Pods use them with
``imagePullPolicy: Never``.

Lifecycle. :func:`start_node` records the node's marks on the host (``_footprint``) before it
makes any, and starts a *keeper* (``_keeper``): a small process of its own session that waits for the starting
process to die and then removes everything (processes, shims and containers, mounts, the network
namespace and veth, cgroups, the kubelet's hard-coded files, the kernel settings the kubelet
changed). :meth:`Node.stop` does the same at once and dismisses the keeper. A node index is held
with a lock in ``/run/otterscale-node``; a node that a killed run left behind is cleaned up by the
next start of the same index.

Needs root, Linux, veth/bridge/br_netfilter/nf_tables, and the binaries :func:`preflight` lists.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _footprint, _nodeconf, _pki
from ._archive import write_binary_image
from ._controlplane import ControlPlane, KubeAPIError
from ._footprint import LOCK_DIR, Footprint
from ._keeper import start_keeper
from ._nodeconf import NodeLayout
from ._process import ManagedProcess
from .images import load_index
from .tools import NODE_TOOLS, TOOLS, ToolMissingError, cache_root, tool_path

logger = logging.getLogger(__name__)

#: Seconds: API server ready, node Ready and untainted, a Pod Ready, CoreDNS Ready.
APISERVER_TIMEOUT = 120.0
NODE_READY_TIMEOUT = 120.0
POD_READY_TIMEOUT = 180.0
#: Seconds each node process gets to exit after SIGTERM at stop (its state is thrown away anyway).
STOP_GRACE = 2.0
#: The images made here from the tools cache (no registry).
PAUSE_IMAGE = f"localhost/otterscale/pause:{TOOLS['pause'].version}"
COREDNS_IMAGE = f"localhost/otterscale/coredns:{TOOLS['coredns'].version}"
#: System binaries (Debian: containerd, runc, containernetworking-plugins, iptables, conntrack).
SYSTEM_BINARIES = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "containerd-shim-runc-v2": "containerd",
    "iptables": "iptables",
    "conntrack": "conntrack",
    "ip": "iproute2",
    "nsenter": "util-linux",
}
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
CNI_DIR = Path("/usr/lib/cni")
#: The control plane and node tools from the tools cache.
NODE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", *NODE_TOOLS)

Progress = Callable[[str], None]


class NodeUnavailableError(RuntimeError):
    """This machine cannot run the test node; the message lists what is missing."""


class NodeError(RuntimeError):
    """The test node failed to start or to do what a test asked."""


# --------------------------------------------------------------------------------------------------
# Preflight


def preflight() -> list[str]:
    """What the node misses here (empty: it can run), each with the command that provides it."""
    problems = []
    if not sys.platform.startswith("linux"):
        return ["the test node runs on Linux only"]
    if os.geteuid() != 0:
        problems.append("the test node needs root (network namespace, mounts, cgroups)")
    missing_tools = [name for name in NODE_BINARIES if not TOOLS[name].path.is_file()]
    if missing_tools:
        problems.append(f"not built: {', '.join(missing_tools)} (nox -s tools -- {' '.join(missing_tools)})")
    packages = sorted(
        {pkg for binary, pkg in SYSTEM_BINARIES.items() if shutil.which(binary) is None and not _sbin(binary)}
    )
    packages += (
        ["containernetworking-plugins"] if any(not (CNI_DIR / p).is_file() for p in CNI_PLUGINS) else []
    )
    if packages:
        problems.append(f"missing system packages: apt-get install {' '.join(sorted(set(packages)))}")
    if not Path("/sys/fs/cgroup").is_dir():
        problems.append("no cgroup file system at /sys/fs/cgroup")
    return problems


def _sbin(binary: str) -> str | None:
    for folder in ("/usr/sbin", "/sbin", "/usr/bin"):
        if Path(folder, binary).is_file():
            return str(Path(folder, binary))
    return None


def _which(binary: str) -> str:
    found = shutil.which(binary) or _sbin(binary)
    if found is None:
        raise NodeUnavailableError(f"{binary} is not installed")
    return found


def unavailable_message(problems: Sequence[str]) -> str:
    return "the test node cannot run here: " + "; ".join(problems)


# --------------------------------------------------------------------------------------------------
# Small helpers


def _run(argv: Sequence[str], *, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``path`` only when its content changes (kube-proxy exits when its config is rewritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _stderr_progress(message: str) -> None:
    # sys.__stderr__: pytest captures sys.stderr, and a minute of silence looks like a hang.
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"[node] {message}\n")
    stream.flush()


def _acquire_index(index: int | None) -> tuple[int, int]:
    """A free node index and the fd of its lock (held for the node's lifetime)."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    candidates = [index] if index is not None else list(range(_nodeconf.MAX_NODES))
    for i in candidates:
        fd = os.open(LOCK_DIR / f"{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)  # the keeper holds it too, until it has cleaned up
        return i, fd
    raise NodeError(f"node index {index} is in use" if index is not None else "every node index is in use")


def _clean_leftovers(index: int, progress: Progress) -> None:
    """A node a killed run left behind at this index (its keeper was killed too): remove it."""
    pointer = LOCK_DIR / f"{index}.json"
    if pointer.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            old = Footprint.load(Path(json.loads(pointer.read_text())["directory"]))
            progress(f"cleaning up node {index} left behind in {old.directory}")
            for error in _footprint.clean(old):
                progress(f"  {error}")
        pointer.unlink(missing_ok=True)
    layout = NodeLayout(index, Path("/nonexistent"))
    for argv in (["ip", "link", "del", layout.host_veth], ["ip", "netns", "del", layout.netns]):
        subprocess.run(argv, capture_output=True, check=False)


# --------------------------------------------------------------------------------------------------
# The node


class Node:
    """A running test node. Build with :func:`start_node`; always :meth:`stop` it."""

    def __init__(self, layout: NodeLayout, footprint: Footprint, lock_fd: int, progress: Progress) -> None:
        self.layout = layout
        self.footprint = footprint
        self.progress = progress
        self.processes: dict[str, ManagedProcess] = {}
        self.keeper: subprocess.Popen[bytes] | None = None
        self._lock_fd = lock_fd
        self._started = time.monotonic()
        #: Seconds from the start to each step (``netns``, ``apiserver``, ``ready``, ...).
        self.timings: dict[str, float] = {}
        #: Image refs imported into the node's containerd, by archive path.
        self._imported: dict[str, str] = {}
        self._import_lock = threading.Lock()
        self.stopped = False
        self.control_plane = ControlPlane(layout.name, layout.directory)
        self.control_plane.server = layout.server

    # --- what tests use -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def directory(self) -> Path:
        return self.layout.directory

    @property
    def node_ip(self) -> str:
        return self.layout.node_ip

    @property
    def host_ip(self) -> str:
        """The host's address as Pods reach it (bind host-side test services here)."""
        return self.layout.host_ip

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (``system:masters``), usable from the host."""
        return self.control_plane.kubeconfig

    def step(self, what: str) -> None:
        elapsed = time.monotonic() - self._started
        self.timings[what] = round(elapsed, 2)
        self.progress(f"[{elapsed:6.1f}s] {what}")

    def image(self, key: str) -> str:
        """Import image ``key`` of ``nox -s images`` (``otterscale-hub``, ``otterscale-agent``,
        ``python``) into the node if it is not there yet; returns the reference Pods use."""
        entry = load_index().get(key)
        if entry is None or not Path(entry["archive"]).is_file():
            raise NodeError(
                f"image {key!r} is not built: run `nox -s images` (it saves the archives the node imports)"
            )
        return self.import_archive(Path(entry["archive"]), entry["ref"])

    def import_archive(self, archive: Path, ref: str) -> str:
        """``ctr images import`` an image archive into the node's containerd (once per archive)."""
        with self._import_lock:
            key = f"{archive}:{archive.stat().st_mtime_ns}"
            if key in self._imported:
                return self._imported[key]
            started = time.monotonic()
            _run(
                [
                    _which("ctr"),
                    f"--address={self.layout.containerd_socket}",
                    "--namespace=k8s.io",
                    "images",
                    "import",
                    str(archive),
                ],
                timeout=600,
            )
            self._imported[key] = _normalized(ref)
            self.progress(
                f"imported {ref} ({archive.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - started:.1f}s"
            )
            return self._imported[key]

    def run_pod(
        self,
        name: str,
        image: str,
        command: Sequence[str],
        *,
        namespace: str = "default",
        labels: dict[str, str] | None = None,
        wait: bool = True,
        timeout: float = POD_READY_TIMEOUT,
    ) -> dict[str, Any]:
        """Create a Pod running ``command`` in ``image`` (a ref :meth:`image` returned) under the
        charts' security settings (non-root, read-only root, no capabilities); wait until Ready."""
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 5,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 65532,
                    "runAsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "main",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": list(command),
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108 - a Pod's emptyDir
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}],
            },
        }
        created: dict[str, Any] = self.control_plane.request(
            "POST", f"/api/v1/namespaces/{namespace}/pods", pod
        )
        if wait:
            return self.wait_pod_ready(namespace, name, timeout=timeout)
        return created

    def wait_pod_ready(self, namespace: str, name: str, timeout: float = POD_READY_TIMEOUT) -> dict[str, Any]:
        """Wait until the Pod is Ready; fails early (with its status) if it cannot start."""
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            pod: dict[str, Any] = self.control_plane.request("GET", path)
            if _pod_ready(pod):
                return pod
            problem = _pod_problem(pod)
            if problem or time.monotonic() > deadline:
                raise NodeError(
                    f"pod {namespace}/{name} not Ready: {problem or 'timed out'}; status {pod.get('status')}"
                )
            time.sleep(0.2)

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """The container's log, through the API server and the kubelet (as ``kubectl logs``)."""
        query = f"?container={container}" if container else ""
        return self.control_plane_text(f"/api/v1/namespaces/{namespace}/pods/{name}/log{query}")

    def control_plane_text(self, path: str) -> str:
        """A plain-text GET as admin (logs are not JSON)."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.layout.server + path)  # noqa: S310 - the node's API server
        try:
            with urllib.request.urlopen(req, context=self.control_plane.ssl_context, timeout=30) as resp:  # noqa: S310
                return str(resp.read().decode(errors="replace"))
        except urllib.error.HTTPError as exc:
            raise KubeAPIError(exc.code, exc.read().decode(errors="replace")) from None

    def kill_container(self, namespace: str, name: str, container: str) -> int:
        """SIGKILL every process of one running container from the host (a crash: no SIGTERM, no
        cleanup in the container); returns how many were killed. The kubelet restarts it."""
        pod = self.control_plane.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        statuses = pod["status"].get("containerStatuses", [])
        found = next((c for c in statuses if c["name"] == container and c.get("containerID")), None)
        if found is None:
            raise NodeError(f"pod {namespace}/{name} has no running container {container!r}")
        container_id = found["containerID"].split("://", 1)[1]
        pids = {
            pid
            for folder in _footprint.cgroup_dirs(self.footprint.cgroup_root)
            if folder.name == container_id
            for pid in _footprint.cgroup_pids_of(folder)
        }
        if not pids:
            raise NodeError(
                f"no process of container {container} ({container_id[:12]}) in the node's cgroups"
            )
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def check_alive(self) -> None:
        """Raise :class:`NodeError` (with the log's tail) if one of the node's processes died."""
        for name, proc in self.processes.items():
            if not proc.alive():
                code, log = proc.popen.returncode, proc.log_file
                raise NodeError(f"node process {name} exited with {code}; log {log}:\n{proc.log_tail()}")

    def logs(self) -> dict[str, str]:
        """Every node process's log."""
        return {p.name: p.read_text(errors="replace") for p in sorted(self.layout.path("log").glob("*.log"))}

    # --- lifecycle ----------------------------------------------------------------------------

    def spawn(
        self, name: str, binary: Path | str, args: Sequence[str], *, netns: bool = True
    ) -> ManagedProcess:
        argv = [str(binary), *args]
        if netns:
            argv = [_which("nsenter"), f"--net=/run/netns/{self.layout.netns}", "--", *argv]
        proc = ManagedProcess(f"{self.name}/{name}", argv, self.layout.path("log", f"{name}.log"))
        self.processes[name] = proc
        self.footprint.record_process(name, proc.pid, str(binary))
        return proc

    def stop(self, *, keep: bool = False) -> list[str]:
        """Stop everything and remove the node's marks on the host; returns what could not be undone.

        Safe to call twice. ``keep`` keeps the node's folder (logs, etcd, certificates); the
        containerd image store is always removed (it is large and rebuilt in seconds).
        """
        if self.stopped:
            return []
        self.stopped = True
        started = time.monotonic()
        # The kubelet first (it would restart the containers), then the containers themselves
        # (nothing of theirs is worth a graceful stop), then the rest, newest first.
        for name in ("kubelet", "kube-proxy"):
            if name in self.processes:
                self.processes[name].stop(timeout=STOP_GRACE)
        errors = _footprint.kill_containers(self.footprint)
        sandboxes = _footprint.sandbox_ids(self.footprint)
        pods = _footprint.pod_netns(self.footprint, sandboxes)
        for proc in reversed(list(self.processes.values())):
            proc.stop(timeout=STOP_GRACE)
        errors += _footprint.clean(self.footprint)
        errors += [f"left behind: {mark}" for mark in _footprint.remaining(self.footprint, sandboxes, pods)]
        if self.keeper is not None and self.keeper.poll() is None:
            self.keeper.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.keeper.wait(10)
        (LOCK_DIR / f"{self.layout.index}.json").unlink(missing_ok=True)
        os.close(self._lock_fd)
        shutil.rmtree(self.layout.path("containerd"), ignore_errors=True)
        if not keep:
            for sub in ("kubelet", "etcd", "cni", "pod-logs"):
                shutil.rmtree(self.layout.path(sub), ignore_errors=True)
        self.progress(
            f"stopped in {time.monotonic() - started:.1f}s" + (f"; not undone: {errors}" if errors else "")
        )
        return errors

    def __repr__(self) -> str:
        return f"Node(name={self.name!r}, server={self.layout.server!r})"


def _normalized(ref: str) -> str:
    """The name containerd stores for ``ref`` (Docker Hub names get ``docker.io/[library/]``)."""
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"docker.io/{ref}" if "/" in ref else f"docker.io/library/{ref}"


def _pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


#: Container states that will not fix themselves within a test's patience.
_BAD_REASONS = {
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


def _pod_problem(pod: dict[str, Any]) -> str | None:
    status = pod.get("status", {})
    if status.get("phase") in ("Failed", "Succeeded"):
        return f"phase {status['phase']}"
    for container in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
        waiting = container.get("state", {}).get("waiting", {})
        if waiting.get("reason") in _BAD_REASONS:
            return f"container {container['name']}: {waiting['reason']}: {waiting.get('message', '')}"
        if container.get("restartCount", 0) >= 3:
            return f"container {container['name']} restarted {container['restartCount']} times"
    return None


# --------------------------------------------------------------------------------------------------
# Start


def start_node(
    directory: Path,
    *,
    index: int | None = None,
    coredns: bool = True,
    progress: Progress | None = None,
) -> Node:
    """Start a node in ``directory`` and wait until it is Ready (see the module docstring).

    Raises :class:`NodeUnavailableError` (what is missing, how to get it) before changing anything
    when this machine cannot run it; on any later failure everything started is stopped again.
    """
    problems = preflight()
    if problems:
        raise NodeUnavailableError(unavailable_message(problems))
    report = progress or _stderr_progress
    i, lock_fd = _acquire_index(index)
    _clean_leftovers(i, report)
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    layout = NodeLayout(i, directory)
    footprint = _footprint.snapshot(
        Footprint(
            directory=str(directory),
            netns=layout.netns,
            host_veth=layout.host_veth,
            cgroup_root=layout.cgroup_root,
            cni_network=layout.cni_network,
            containerd_socket=str(layout.containerd_socket),
        )
    )
    (LOCK_DIR / f"{i}.json").write_text(json.dumps({"directory": str(directory)}))
    node = Node(layout, footprint, lock_fd, report)
    try:
        node.keeper = start_keeper(layout.directory, layout.path("log", "keeper.log"), lock_fd)
        _start(node, coredns=coredns)
    except BaseException:
        node.stop(keep=True)
        raise
    return node


def _start(node: Node, *, coredns: bool) -> None:
    layout = node.layout
    for sub in ("log", "conf", "pki"):
        layout.path(sub).mkdir(parents=True, exist_ok=True)
    _network(layout)
    node.step(f"network namespace {layout.netns}: node {layout.node_ip}, host {layout.host_ip}")
    pki = _pki_files(layout)
    node.step("certificates")
    _configs(layout, pki)
    _cgroups(layout)

    containerd = node.spawn(
        "containerd", _which("containerd"), ["--config", str(layout.path("conf", "containerd.toml"))]
    )
    containerd.wait_until(
        lambda: _run(
            [_which("ctr"), f"--address={layout.containerd_socket}", "version"], check=False, timeout=10
        )
        .strip()
        .startswith("Client"),
        timeout=60,
        what="answering (ctr version)",
    )
    node.step("containerd up")
    images = cache_root() / "images" / "node"
    images.mkdir(parents=True, exist_ok=True)
    importer = threading.Thread(
        target=_import_node_images, args=(node, images, coredns), name="node-image-import", daemon=True
    )
    importer.start()

    etcd = node.spawn(
        "etcd",
        tool_path("etcd"),
        [
            "--name=default",
            f"--data-dir={layout.path('etcd')}",
            f"--listen-client-urls=http://127.0.0.1:{_nodeconf.ETCD_CLIENT_PORT}",
            f"--advertise-client-urls=http://127.0.0.1:{_nodeconf.ETCD_CLIENT_PORT}",
            f"--listen-peer-urls=http://127.0.0.1:{_nodeconf.ETCD_PEER_PORT}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{_nodeconf.ETCD_PEER_PORT}",
            f"--initial-cluster=default=http://127.0.0.1:{_nodeconf.ETCD_PEER_PORT}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    etcd.wait_until(lambda: _etcd_ready(layout), timeout=30, what="accepting connections")
    node.step("etcd up")

    apiserver = node.spawn("kube-apiserver", tool_path("kube-apiserver"), _apiserver_args(layout, pki))
    apiserver.wait_until(node.control_plane._ready, timeout=APISERVER_TIMEOUT, what="ready (/readyz)")
    node.step("kube-apiserver ready")

    node.spawn("kube-controller-manager", tool_path("kube-controller-manager"), _kcm_args(layout, pki))
    node.spawn(
        "kube-scheduler",
        tool_path("kube-scheduler"),
        [
            f"--kubeconfig={pki['scheduler-kubeconfig']}",
            f"--authentication-kubeconfig={pki['scheduler-kubeconfig']}",
            f"--authorization-kubeconfig={pki['scheduler-kubeconfig']}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
            "--v=1",
        ],
    )
    importer.join()  # the sandbox image must be in containerd before the kubelet starts Pods
    if getattr(importer, "error", None):
        raise NodeError(f"importing the node's images failed: {importer.error}")  # type: ignore[attr-defined]
    node.step("pause and CoreDNS images imported")
    node.spawn(
        "kubelet",
        tool_path("kubelet"),
        [
            f"--config={layout.path('conf', 'kubelet.yaml')}",
            f"--kubeconfig={pki['kubelet-kubeconfig']}",
            f"--root-dir={layout.path('kubelet')}",
            f"--cert-dir={layout.path('kubelet', 'pki')}",
            f"--hostname-override={layout.name}",
            f"--node-ip={layout.node_ip}",
            "--v=1",
        ],
    )
    node.spawn(
        "kube-proxy", tool_path("kube-proxy"), [f"--config={layout.path('conf', 'kube-proxy.yaml')}", "--v=1"]
    )
    _wait(
        node, lambda: _node_schedulable(node), NODE_READY_TIMEOUT, f"node {layout.name} Ready and untainted"
    )
    node.step(f"node {layout.name} Ready")
    _wait(
        node,
        lambda: node.control_plane.request("GET", "/api/v1/namespaces/default/serviceaccounts/default"),
        NODE_READY_TIMEOUT,
        "the default service account",
    )
    if coredns:
        for obj in _nodeconf.coredns_objects(layout, COREDNS_IMAGE):
            node.control_plane.apply(obj)
        _wait(
            node,
            lambda: _deployment_ready(node, "kube-system", "coredns"),
            POD_READY_TIMEOUT,
            "CoreDNS Ready",
        )
        node.step("CoreDNS ready")


def _wait(node: Node, check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        node.check_alive()
        with contextlib.suppress(KubeAPIError, OSError):
            if check():
                return
        if time.monotonic() > deadline:
            raise NodeError(f"{what}: not reached within {timeout:.0f}s (logs in {node.layout.path('log')})")
        time.sleep(0.2)


def _etcd_ready(layout: NodeLayout) -> bool:
    # etcd listens inside the node's namespace: connect from there (the host cannot).
    probe = f"import socket; socket.create_connection(('127.0.0.1', {_nodeconf.ETCD_CLIENT_PORT}), timeout=1)"
    return (
        subprocess.run(
            [_which("nsenter"), f"--net=/run/netns/{layout.netns}", "--", sys.executable, "-c", probe],
            capture_output=True,
            check=False,
            timeout=10,
        ).returncode
        == 0
    )


def _node_schedulable(node: Node) -> bool:
    found = node.control_plane.request("GET", f"/api/v1/nodes/{node.layout.name}")
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in found["status"].get("conditions", []))
    taints = [t for t in found["spec"].get("taints", []) if t.get("effect") in ("NoSchedule", "NoExecute")]
    return ready and not taints


def _deployment_ready(node: Node, namespace: str, name: str) -> bool:
    found = node.control_plane.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    want = found["spec"].get("replicas", 1)
    status = found.get("status", {})
    return bool(status.get("readyReplicas", 0) == want and status.get("updatedReplicas", 0) == want)


def _import_node_images(node: Node, folder: Path, coredns: bool) -> None:
    try:
        wanted = [("pause", PAUSE_IMAGE, "/pause")] + (
            [("coredns", COREDNS_IMAGE, "/coredns")] if coredns else []
        )
        for tool, ref, target in wanted:
            binary = tool_path(tool)
            digest = hashlib.sha256(binary.read_bytes()).hexdigest()[:16]
            archive = folder / f"{tool}-{TOOLS[tool].version}-{digest}.tar"
            if not archive.is_file():
                write_binary_image(archive, ref, binary, target=target)
            node.import_archive(archive, ref)
    except (NodeError, ToolMissingError, OSError) as exc:
        threading.current_thread().error = exc  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# Network, certificates, configuration, cgroups


def _network(layout: NodeLayout) -> None:
    ns, host, peer = layout.netns, layout.host_veth, layout.node_veth
    prefix = layout.link_prefix
    _run(["ip", "netns", "add", ns])
    _run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer])
    _run(["ip", "link", "set", peer, "netns", ns])
    # Never forward what arrives from the node: Pods reach the host's own addresses only.
    Path(f"/proc/sys/net/ipv4/conf/{host}/forwarding").write_text("0")
    _run(["ip", "addr", "add", f"{layout.host_ip}/{prefix}", "dev", host])
    _run(["ip", "link", "set", host, "up"])
    for argv in (
        ["link", "set", "lo", "up"],
        ["addr", "add", f"{layout.node_ip}/{prefix}", "dev", peer],
        ["link", "set", peer, "up"],
        ["route", "add", "default", "via", layout.host_ip],
    ):
        _run(["ip", "-n", ns, *argv])
    # Inside the node only (these are per network namespace): route Pod traffic, filter bridged
    # packets through iptables (kube-proxy's Service rules).
    script = (
        "echo 1 > /proc/sys/net/ipv4/ip_forward; "
        "if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then "
        "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables; fi"
    )
    _run(["ip", "netns", "exec", ns, "sh", "-c", script])
    for cidr in (layout.pod_cidr, layout.service_cidr):
        _run(["ip", "route", "add", cidr, "via", layout.node_ip, "dev", host])


def _pki_files(layout: NodeLayout) -> dict[str, Path]:
    d = layout.path("pki")
    ca = _pki.CertificateAuthority(d, common_name=f"{layout.name}-ca")
    sans = (
        layout.node_ip,
        layout.kubernetes_service_ip,
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{_nodeconf.CLUSTER_DOMAIN}",
    )
    files: dict[str, Path] = {"ca": ca.cert_file, "ca-key": d / "ca.key"}
    _pki._write_key(files["ca-key"], ca.key)
    files["apiserver"], files["apiserver-key"] = ca.issue("apiserver", "kube-apiserver", server_names=sans)
    files["admin"], files["admin-key"] = ca.issue(
        "admin", "admin", organizations=("system:masters",), client=True
    )
    files["kubelet-client"], files["kubelet-client-key"] = ca.issue(
        "apiserver-kubelet-client",
        "kube-apiserver-kubelet-client",
        organizations=("system:masters",),
        client=True,
    )
    files["sa-key"], files["sa-pub"] = _pki.write_service_account_keys(d)
    identities = {
        "kubelet": (f"system:node:{layout.name}", ("system:nodes",)),
        "kube-proxy": ("system:kube-proxy", ()),
        "scheduler": ("system:kube-scheduler", ()),
    }
    for stem, (cn, orgs) in identities.items():
        cert, key = ca.issue(stem, cn, organizations=orgs, client=True)
        path = layout.path("conf", f"{stem}.kubeconfig")
        _write(path, _nodeconf.kubeconfig(layout, user=cn, ca_file=ca.cert_file, cert=cert, key=key), 0o600)
        files[f"{stem}-kubeconfig"] = path
    admin = layout.path("admin.kubeconfig")
    _write(
        admin,
        _nodeconf.kubeconfig(
            layout, user="admin", ca_file=ca.cert_file, cert=files["admin"], key=files["admin-key"]
        ),
        0o600,
    )
    return files


def _configs(layout: NodeLayout, pki: dict[str, Path]) -> None:
    conf = layout.path("conf")
    _write(
        conf / "containerd.toml",
        _nodeconf.containerd_config(layout, sandbox_image=PAUSE_IMAGE, runc=_which("runc")),
    )
    _write(layout.path("cni", "net.d", "10-otterscale-node.conflist"), _nodeconf.cni_config(layout))
    _write(conf / "kubelet.yaml", _nodeconf.kubelet_config(layout, ca_file=pki["ca"]))
    _write(
        conf / "kube-proxy.yaml", _nodeconf.kube_proxy_config(layout, kubeconfig=pki["kube-proxy-kubeconfig"])
    )
    layout.pod_logs.mkdir(parents=True, exist_ok=True)


def _cgroups(layout: NodeLayout) -> None:
    """The node's cgroup parent in every v1 hierarchy (the kubelet creates kubepods below it)."""
    root = Path("/sys/fs/cgroup")
    for hierarchy in root.iterdir():
        if hierarchy.is_dir() and not hierarchy.is_symlink() and (hierarchy / "cgroup.procs").exists():
            target = hierarchy / layout.cgroup_root.strip("/")
            target.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":  # a new cpuset cgroup starts with no CPUs and no memory nodes
                for key in ("cpuset.cpus", "cpuset.mems"):
                    (target / key).write_text((hierarchy / key).read_text())


def _apiserver_args(layout: NodeLayout, pki: dict[str, Path]) -> list[str]:
    return [
        f"--advertise-address={layout.node_ip}",
        "--bind-address=0.0.0.0",  # inside the node's namespace: the node address and its loopback
        f"--secure-port={_nodeconf.APISERVER_PORT}",
        f"--cert-dir={layout.path('kube-apiserver')}",
        f"--tls-cert-file={pki['apiserver']}",
        f"--tls-private-key-file={pki['apiserver-key']}",
        f"--client-ca-file={pki['ca']}",
        f"--etcd-servers=http://127.0.0.1:{_nodeconf.ETCD_CLIENT_PORT}",
        f"--service-account-key-file={pki['sa-pub']}",
        f"--service-account-signing-key-file={pki['sa-key']}",
        f"--service-account-issuer=https://kubernetes.default.svc.{_nodeconf.CLUSTER_DOMAIN}",
        f"--service-cluster-ip-range={layout.service_cidr}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        f"--kubelet-client-certificate={pki['kubelet-client']}",
        f"--kubelet-client-key={pki['kubelet-client-key']}",
        # The node's name means nothing to the host's resolver: reach the kubelet by its address.
        "--kubelet-preferred-address-types=InternalIP",
        "--allow-privileged=true",
        "--profiling=false",
        "--v=0",
    ]


def _kcm_args(layout: NodeLayout, pki: dict[str, Path]) -> list[str]:
    admin = layout.path("admin.kubeconfig")
    return [
        f"--kubeconfig={admin}",
        f"--authentication-kubeconfig={admin}",
        f"--authorization-kubeconfig={admin}",
        "--controllers=*",
        f"--service-account-private-key-file={pki['sa-key']}",
        f"--root-ca-file={pki['ca']}",
        f"--cluster-signing-cert-file={pki['ca']}",
        f"--cluster-signing-key-file={pki['ca-key']}",
        f"--service-cluster-ip-range={layout.service_cidr}",
        "--use-service-account-credentials=false",
        "--leader-elect=false",
        "--node-monitor-period=2s",
        "--bind-address=127.0.0.1",
        "--secure-port=10257",
        f"--cert-dir={layout.path('kcm')}",
        "--v=0",
    ]
