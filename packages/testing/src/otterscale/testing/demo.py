"""``nox -s demo``: the whole OtterScale stack on this machine, ready for a first API call.

Starts a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager), a real
Keycloak with the ``otterscale`` realm, the hub (``otterscale server``) and one agent
(``otterscale agent``), connected through real chisel tunnels. Then it prints a command that lists
the cluster's namespaces through the hub with a fresh token, writes a small JSON file for scripts
(hub URL, cluster names, token file path), keeps the token file fresh, and tears everything down
on Ctrl-C (or SIGTERM). If the hub or the agent dies meanwhile, it says so (with the log's tail)
and exits 1.

``--smoke`` makes that call itself and exits (CI runs it so the demo cannot rot).
``--cors-origin ORIGIN`` (repeatable) lets browser pages of that origin call the hub (the hub's
``cors.allowed_origins``), for trying a dashboard served elsewhere against the demo.

Exit status: 0 after Ctrl-C (or ``--smoke``), 1 when something could not start or died, 130 when
interrupted during start-up. Everything started is stopped in every case.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from otterscale.common import CorsConfig

from ._controlplane import ControlPlane, start_control_plane
from ._keycloak import Keycloak, KeycloakError, start_keycloak
from ._system import System, start_system
from .tools import ToolMissingError

CLUSTER = "demo"
DEMO_USER = "alice"
DEMO_GROUP = "team-a"
#: The token lives 15 minutes; rewrite the file well before that.
TOKEN_REFRESH_SECONDS = 300
#: How often the running demo checks that the hub and the agent are still alive.
HEALTH_CHECK_SECONDS = 5


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _grant_view(cp: ControlPlane) -> None:
    """Let the demo user's group read everything (ClusterRole view) in the demo cluster."""
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "otterscale-demo-view"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": DEMO_GROUP}],
        }
    )
    # `view` does not cover namespaces at cluster scope; the demo's first call lists them.
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "otterscale-demo-namespaces"},
            "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}],
        }
    )
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "otterscale-demo-namespaces"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "otterscale-demo-namespaces",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": DEMO_GROUP}],
        }
    )


def _write_token(keycloak: Keycloak, path: Path) -> None:
    token = keycloak.token(DEMO_USER)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    tmp.replace(path)


def list_namespaces_command(hub_url: str, token_file: Path) -> str:
    body = json.dumps({"cluster": CLUSTER, "version": "v1", "resource": "namespaces"})
    return (
        f'curl -sS -H "Authorization: Bearer $(cat {shlex.quote(str(token_file))})" '
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)} "
        f"{hub_url}/otterscale.resource.v1.ResourceService/List"
    )


def list_namespaces(hub_url: str, token: str) -> list[str]:
    """The call the printed command makes, from Python (used by --smoke)."""
    body = json.dumps({"cluster": CLUSTER, "version": "v1", "resource": "namespaces"}).encode()
    req = urllib.request.Request(  # noqa: S310 - loopback demo URL
        f"{hub_url}/otterscale.resource.v1.ResourceService/List",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        listed: dict[str, Any] = json.loads(resp.read())
    return sorted(item["object"]["metadata"]["name"] for item in listed.get("items", []))


class _Signals:
    """SIGINT/SIGTERM: abort the start-up (KeyboardInterrupt), then ask the demo loop to stop.

    Once stopping, further signals are ignored, so an impatient second Ctrl-C cannot cut the
    teardown short and leave processes behind.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.running = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def stopping(self) -> None:
        self.running = False
        self.stop.set()

    def _handle(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            _log(f"{signal.Signals(signum).name}: already stopping")
            return
        if self.running:
            self.stop.set()
            return
        self.stop.set()
        raise KeyboardInterrupt


def _cors_origin(value: str) -> str:
    """One ``--cors-origin``, checked as the hub checks ``cors.allowed_origins`` (canonical form)."""
    try:
        config = CorsConfig(allowed_origins=(value,))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc.errors()[0]['msg']}") from None
    return config.allowed_origins[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nox -s demo --",
        description="Run a local OtterScale stack (control plane, Keycloak, hub, agent) until Ctrl-C.",
    )
    parser.add_argument("--dir", type=Path, default=None, help="working directory (default: a new temp dir)")
    parser.add_argument("--smoke", action="store_true", help="make the first call, print it, and exit")
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        type=_cors_origin,
        metavar="ORIGIN",
        help="let browser pages of ORIGIN (scheme://host[:port], or https://*.example.com) call the hub; "
        "repeatable",
    )
    args = parser.parse_args(argv)
    extra_config = {"cors": {"allowed_origins": args.cors_origin}} if args.cors_origin else None

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="otterscale-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    signals = _Signals()
    signals.install()

    cp: ControlPlane | None = None
    keycloak: Keycloak | None = None
    system: System | None = None
    started = time.monotonic()
    try:
        _log(f"working directory {workdir} (logs of every process are here)")
        _log("starting a Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)...")
        cp = start_control_plane(CLUSTER, workdir / "cluster")
        _grant_view(cp)
        _log(f"  ready at {cp.server} in {cp.startup_seconds:.1f}s")
        _log("starting Keycloak (the first start takes up to a minute)...")
        keycloak = start_keycloak(workdir / "keycloak")
        _log(f"  ready at {keycloak.realm_url} in {keycloak.startup_seconds:.1f}s")
        _log("starting the hub and the agent (chisel tunnel)...")
        system = start_system(
            workdir / "system",
            {CLUSTER: cp},
            realm_url=keycloak.realm_url,
            log_level="info",
            extra_config=extra_config,
        )
        _log(
            f"  hub ready in {system.timings.hub_start[-1]:.1f}s, agent connected "
            f"{system.timings.agent_connect[CLUSTER][-1]:.1f}s after its start"
        )
        token_file = workdir / "token"
        _write_token(keycloak, token_file)
        names = _wait_for_first_call(system.hub_url, token_file.read_text())
        info = {
            "hub_url": system.hub_url,
            "clusters": sorted(system.clusters),
            "token_file": str(token_file),
            "user": DEMO_USER,
            "realm_url": keycloak.realm_url,
            "config": str(system.config_path),
            "kubeconfig": str(cp.kubeconfig),
            "workdir": str(workdir),
            "cors_origins": args.cors_origin,
        }
        info_file = workdir / "demo.json"
        info_file.write_text(json.dumps(info, indent=2) + "\n")
        _log(f"up in {time.monotonic() - started:.0f}s; namespaces seen through the hub: {', '.join(names)}")
        if args.cors_origin:
            _log(f"browser pages of {', '.join(args.cors_origin)} may call the hub (CORS)")
            if args.smoke:
                for origin in args.cors_origin:
                    if "*" not in origin:
                        _log(f"CORS preflight from {origin}: {_preflight(system.hub_url, origin)}")
        print(
            "\nOtterScale is running. List the namespaces of cluster "
            f"'{CLUSTER}' through the hub as {DEMO_USER}:\n\n  "
            + list_namespaces_command(system.hub_url, token_file)
            + f"\n\nScripts: {info_file}\n"
            + ("--smoke: stopping now.\n" if args.smoke else "Press Ctrl-C to stop.\n"),
            flush=True,
        )
        if args.smoke:
            return 0
        signals.running = True
        return _run_until_stopped(signals.stop, system, keycloak, token_file)
    except KeyboardInterrupt:
        _log("interrupted during start-up")
        return 130
    except (ToolMissingError, KeycloakError) as exc:
        _log(f"cannot start: {exc}")
        return 1
    finally:
        signals.stopping()
        _log("stopping...")
        for closer in (system, keycloak, cp):
            if closer is not None:
                closer.stop()
        _log("stopped")


def _run_until_stopped(stop: threading.Event, system: System, keycloak: Keycloak, token_file: Path) -> int:
    """Keep the token file fresh and watch the processes until Ctrl-C (0) or one of them dies (1)."""
    refreshed = time.monotonic()
    while not stop.wait(HEALTH_CHECK_SECONDS):
        dead = [
            (name, proc)
            for name, proc in (("hub", system.hub), *((f"agent {n}", a) for n, a in system.agents.items()))
            if proc is None or not proc.alive()
        ]
        if dead:
            for name, proc in dead:
                where = f"; log {proc.log_file}:\n{proc.log_tail()}" if proc is not None else ""
                _log(f"the {name} stopped unexpectedly{where}")
            return 1
        if time.monotonic() - refreshed >= TOKEN_REFRESH_SECONDS:
            try:
                _write_token(keycloak, token_file)
                refreshed = time.monotonic()
            except KeycloakError as exc:  # try again at the next check; the old token still works
                _log(f"could not refresh the token: {exc}")
    return 0


def _preflight(hub_url: str, origin: str) -> str:
    """What a browser's preflight from ``origin`` for a List gets (--smoke checks CORS is on)."""
    req = urllib.request.Request(  # noqa: S310 - loopback demo URL
        f"{hub_url}/otterscale.resource.v1.ResourceService/List",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        method="OPTIONS",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        allowed = resp.headers.get("Access-Control-Allow-Origin")
        if resp.status != 204 or allowed != origin:
            raise RuntimeError(f"the hub did not allow {origin}: {resp.status}, Allow-Origin {allowed!r}")
        return f"{resp.status}, Access-Control-Allow-Origin {allowed}"


def _wait_for_first_call(hub_url: str, token: str, timeout: float = 60.0) -> list[str]:
    """The agent's tunnel comes up a moment after its process: retry the first call briefly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return list_namespaces(hub_url, token)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the first call through the hub kept failing: {exc}") from exc
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
