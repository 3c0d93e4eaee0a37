"""``nox -s demo`` cannot rot: the demo module brings the whole stack up, makes its call, and exits.

Runs ``python -m otterscale.testing.demo --smoke`` exactly as the nox session does (its own
control plane, Keycloak, hub and agent): it lists namespaces through the hub the way the printed
command does, prints that command and the scripts' JSON file, tears everything down and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_smoke_starts_everything_and_prints_a_working_command(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTTERSCALE_", "KUBECONFIG"))}
    if "OTTERSCALE_TOOLS_DIR" in os.environ:
        env["OTTERSCALE_TOOLS_DIR"] = os.environ["OTTERSCALE_TOOLS_DIR"]
    done = subprocess.run(
        [
            *(sys.executable, "-m", "otterscale.testing.demo", "--smoke", "--dir", str(workdir)),
            *("--cors-origin", "http://127.0.0.1:5173", "--cors-origin", "https://*.example.com"),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert "curl" in done.stdout
    info_match = re.search(r"Scripts: (\S+\.json)", done.stdout)
    assert info_match, done.stdout
    info = json.loads(Path(info_match.group(1)).read_text())
    assert info["clusters"] == ["demo"]
    assert info["hub_url"].startswith("http://127.0.0.1:")
    assert Path(info["token_file"]).is_file()
    assert "namespaces seen through the hub: " in done.stderr
    seen = done.stderr.split("namespaces seen through the hub: ", 1)[1].splitlines()[0]
    assert {"default", "kube-system"} <= set(seen.split(", "))
    # --cors-origin: the hub allows those origins (the smoke run sent a preflight from the exact one).
    assert info["cors_origins"] == ["http://127.0.0.1:5173", "https://*.example.com"]
    assert "CORS preflight from http://127.0.0.1:5173: 204, Access-Control-Allow-Origin" in done.stderr
    assert "stopped" in done.stderr.splitlines()[-1]
    # Torn down: the hub's port is closed.
    port = int(info["hub_url"].rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_demo_refuses_a_bad_cors_origin_before_starting_anything(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "otterscale.testing.demo", "--dir", str(tmp_path), "--cors-origin", "ftp://x"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--cors-origin: 'ftp://x': must be an http(s) origin" in done.stderr
    assert list(tmp_path.iterdir()) == []
