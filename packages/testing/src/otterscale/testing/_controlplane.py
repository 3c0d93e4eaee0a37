"""Real Kubernetes control planes on loopback: etcd + kube-apiserver + kube-controller-manager.

Started the way envtest starts them (generated certificates, an admin client certificate with
``O=system:masters``, RBAC authorization), plus the controller manager with the namespace,
garbage-collector and service-account controllers so deleted namespaces really go away and Pods
can be admitted. Binaries come from the tools cache (``nox -s tools``).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from . import _pki
from ._process import ManagedProcess, free_port
from ._service import Metrics
from .tools import tool_path

logger = logging.getLogger(__name__)

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
#: Enough of a real cluster for our tests: namespaces really go away, owners' dependents are
#: collected, Pods get their service account, aggregated ClusterRoles (view, edit, admin) get rules.
_CONTROLLERS = ",".join(
    (
        "namespace-controller",
        "garbage-collector-controller",
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "clusterrole-aggregation-controller",
    )
)


class KubeAPIError(RuntimeError):
    """A request to the test control plane returned an error status."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


class ControlPlane:
    """One running test cluster. Use :func:`start_control_plane`; call :meth:`stop` when done."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory
        self.processes: list[ManagedProcess] = []
        self.port = 0
        self.server = ""
        self.kubeconfig = directory / "admin.kubeconfig"
        self.ca_file = directory / "pki" / "ca.crt"
        self.admin_cert = directory / "pki" / "admin.crt"
        self.admin_key = directory / "pki" / "admin.key"
        self.startup_seconds = 0.0
        self._ssl: ssl.SSLContext | None = None
        self._etcd: ManagedProcess | None = None
        #: etcd's client URL (its JSON gateway serves /v3/...; see :meth:`compact`).
        self.etcd_url = ""
        self._apiserver_argv: list[str] = []

    # --- admin access (a small stdlib client so fixtures need no Kubernetes library) -------------

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            ctx.load_cert_chain(str(self.admin_cert), str(self.admin_key))
            self._ssl = ctx
        return self._ssl

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Call the API server as cluster admin; returns the decoded JSON or raises KubeAPIError."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)  # noqa: S310
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context, timeout=timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise KubeAPIError(exc.code, parsed) from None
        return json.loads(raw) if raw else None

    def metrics(self) -> Metrics:
        """kube-apiserver's ``/metrics``, as cluster admin."""
        req = urllib.request.Request(self.server + "/metrics")  # noqa: S310
        with urllib.request.urlopen(req, context=self.ssl_context, timeout=30) as resp:  # noqa: S310
            return Metrics(resp.read().decode())

    def open_watches(self, resource: str, *, group: str = "", scope: str = "namespace") -> float:
        """How many WATCH requests of ``resource`` kube-apiserver is serving right now
        (``apiserver_longrunning_requests``; ``scope`` is ``namespace`` or ``cluster``).

        What a test reads to see that a service's upstream watch opened or ended: the
        controllers' own watches are cluster-wide, so namespaced ones are the tests'.
        """
        return self.metrics().total(
            "apiserver_longrunning_requests", resource=resource, group=group, scope=scope, verb="WATCH"
        )

    def settled_open_watches(self, resource: str, *, within: float = 30.0, **labels: str) -> float:
        """:meth:`open_watches` once the watches of earlier tests have ended (or, after ``within``
        seconds, what is left): the count a test adds its own watch to. A service ends its
        upstream watch a moment after its client went (later on a loaded machine); one ending
        while the test's own opens would leave the count unchanged and hide the new one."""
        deadline = time.monotonic() + within
        while (count := self.open_watches(resource, **labels)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return count

    def apply(self, obj: dict[str, Any], field_manager: str = "otterscale-tests") -> Any:
        """Server-side apply an object as admin (creates or updates)."""
        return self.request(
            "PATCH",
            object_path(obj) + f"?fieldManager={field_manager}&force=true",
            obj,
            content_type="application/apply-patch+yaml",
        )

    def compact(self) -> int:
        """Compact etcd's history up to its current revision (returned), as kube-apiserver does every
        few minutes: continue tokens and resourceVersions older than that expire (HTTP 410)."""

        def call(path: str, body: dict[str, Any]) -> Any:
            req = urllib.request.Request(  # noqa: S310 - loopback etcd of this test cluster
                self.etcd_url + path, data=json.dumps(body).encode(), method="POST"
            )
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                return json.loads(resp.read())

        revision = int(call("/v3/kv/range", {"key": "L29ic2VydmU="})["header"]["revision"])
        call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def wait_for(self, check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
        """Poll ``check()`` until it returns a truthy value (returned); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = check()
            except KubeAPIError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {what} not reached within {timeout:.0f}s")
            time.sleep(0.1)

    # --- lifecycle --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process (controller manager, API server, etcd), newest first."""
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def restart_apiserver(self) -> None:
        """Stop and start kube-apiserver on the same port (for fault tests)."""
        self.stop_apiserver()
        self.start_apiserver()

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver (SIGTERM, bounded wait, SIGKILL); etcd and its data stay.

        With :meth:`start_apiserver` (``wait=False``) a test can watch what clients see while
        the API server is away, then while it comes back. Call both from the main thread (the
        parent-death signal of a child follows the thread that spawned it).
        """
        apiserver = self._apiserver()
        if apiserver is not None:
            apiserver.stop()
            self.processes.remove(apiserver)

    def start_apiserver(self, *, wait: bool = True, timeout: float = 120) -> None:
        """Start kube-apiserver again on the same port and certificates.

        ``wait`` blocks until ``/readyz`` answers 200; without it, poll :meth:`apiserver_ready`.
        """
        if self._apiserver() is not None:
            raise RuntimeError(f"{self.name}: kube-apiserver is already running")
        proc = ManagedProcess(
            f"{self.name}/kube-apiserver",
            self._apiserver_argv,
            self.directory / "kube-apiserver.log",
        )
        self.processes.insert(1, proc)
        if wait:
            proc.wait_until(self._ready, timeout=timeout, what="ready (/readyz)")

    def apiserver_ready(self) -> bool:
        """kube-apiserver answers ``/readyz`` with 200 (False while it is down or starting)."""
        apiserver = self._apiserver()
        if apiserver is None or not apiserver.alive():
            return False
        try:
            return self._ready()
        except (OSError, urllib.error.URLError):
            return False

    def _apiserver(self) -> ManagedProcess | None:
        return next((p for p in self.processes if p.name.endswith("kube-apiserver")), None)

    def _start_apiserver(self) -> None:
        self.start_apiserver()

    def _ready(self) -> bool:
        req = urllib.request.Request(self.server + "/readyz")  # noqa: S310
        with urllib.request.urlopen(req, context=self.ssl_context, timeout=5) as resp:  # noqa: S310
            return bool(resp.status == 200)

    def __repr__(self) -> str:
        return f"ControlPlane(name={self.name!r}, server={self.server!r})"


def object_path(obj: dict[str, Any], *, collection: bool = False) -> str:
    """REST path of an object from its apiVersion/kind/metadata, for the kinds tests use."""
    api_version = obj["apiVersion"]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    kind = obj["kind"]
    plural = _PLURALS.get(kind, kind.lower() + "s")
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    path = f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"
    return path if collection else f"{path}/{meta['name']}"


_PLURALS = {
    "CustomResourceDefinition": "customresourcedefinitions",
    "Endpoints": "endpoints",
    "Ingress": "ingresses",
    "NetworkPolicy": "networkpolicies",
    "PodSecurityPolicy": "podsecuritypolicies",
}


def _write_kubeconfig(cp: ControlPlane) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cp.name,
                "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_file)},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate": str(cp.admin_cert),
                    "client-key": str(cp.admin_key),
                },
            }
        ],
        "contexts": [{"name": cp.name, "context": {"cluster": cp.name, "user": "admin"}}],
        "current-context": cp.name,
    }
    cp.kubeconfig.write_text(yaml.safe_dump(config))
    cp.kubeconfig.chmod(0o600)


def start_control_plane(name: str, directory: Path, *, controller_manager: bool = True) -> ControlPlane:
    """Start etcd, kube-apiserver and (by default) kube-controller-manager; wait until ready.

    Raises :class:`otterscale.testing.tools.ToolMissingError` (with the command that builds the
    binary) before starting anything if a binary is missing.
    """
    etcd_bin = tool_path("etcd")
    apiserver_bin = tool_path("kube-apiserver")
    kcm_bin = tool_path("kube-controller-manager") if controller_manager else None

    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    pki_dir = directory / "pki"
    pki_dir.mkdir(exist_ok=True)
    cp = ControlPlane(name, directory)
    try:
        _start(cp, pki_dir, etcd_bin, apiserver_bin, kcm_bin)
    except BaseException:
        cp.stop()
        raise
    cp.startup_seconds = time.monotonic() - started
    logger.info("control plane %s ready at %s in %.1fs", name, cp.server, cp.startup_seconds)
    return cp


def _start(
    cp: ControlPlane, pki_dir: Path, etcd_bin: Path, apiserver_bin: Path, kcm_bin: Path | None
) -> None:
    ca = _pki.CertificateAuthority(pki_dir)
    serving_cert, serving_key = ca.issue(
        "apiserver",
        "kube-apiserver",
        server_names=("127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
    )
    ca.issue("admin", "admin", organizations=("system:masters",), client=True)
    sa_key, sa_pub = _pki.write_service_account_keys(pki_dir)

    etcd_client, etcd_peer = free_port(), free_port()
    cp.etcd_url = f"http://127.0.0.1:{etcd_client}"
    etcd = ManagedProcess(
        f"{cp.name}/etcd",
        [
            str(etcd_bin),
            "--name=default",
            f"--data-dir={cp.directory / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync",  # test data is disposable; fsync dominates start-up otherwise
            "--log-level=warn",
        ],
        cp.directory / "etcd.log",
    )
    cp.processes.append(etcd)

    cp.port = free_port()
    cp.server = f"https://127.0.0.1:{cp.port}"
    cp._apiserver_argv = [
        str(apiserver_bin),
        "--advertise-address=127.0.0.1",
        "--bind-address=127.0.0.1",
        f"--secure-port={cp.port}",
        f"--cert-dir={cp.directory / 'cert-dir'}",
        f"--tls-cert-file={serving_cert}",
        f"--tls-private-key-file={serving_key}",
        f"--client-ca-file={ca.cert_file}",
        f"--etcd-servers=http://127.0.0.1:{etcd_client}",
        f"--service-account-key-file={sa_pub}",
        f"--service-account-signing-key-file={sa_key}",
        "--service-account-issuer=https://kubernetes.default.svc",
        "--authorization-mode=RBAC",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--allow-privileged=true",
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=0",
    ]

    def etcd_ready() -> bool:
        with socket.create_connection(("127.0.0.1", etcd_client), timeout=1):
            return True

    etcd.wait_until(etcd_ready, timeout=30, what="accepting connections")
    _write_kubeconfig(cp)
    cp._start_apiserver()

    if kcm_bin is not None:
        # The controllers run as cluster admin: with one shared identity instead of a service
        # account per controller, system:kube-controller-manager's own role is far too narrow.
        kcm_kubeconfig = cp.kubeconfig
        kcm = ManagedProcess(
            f"{cp.name}/kube-controller-manager",
            [
                str(kcm_bin),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                f"--controllers={_CONTROLLERS}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={ca.cert_file}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={cp.directory / 'kcm-cert-dir'}",
                "--v=0",
            ],
            cp.directory / "kube-controller-manager.log",
        )
        cp.processes.append(kcm)
        # Ready when it has created the default service account (the serviceaccount controller runs).
        kcm.wait_until(
            lambda: cp.request("GET", "/api/v1/namespaces/default/serviceaccounts/default") is not None,
            timeout=90,
            what="running controllers (default service account)",
        )
