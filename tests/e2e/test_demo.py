"""``nox -s demo`` cannot rot: the demo module brings the whole stack up, makes its call, and exits.

Runs ``python -m otterscale.testing.demo --smoke`` exactly as the nox session does (its own
control plane, Keycloak, hub and agent): it lists namespaces through the hub the way the printed
command does, prints that command and the scripts' JSON file, tears everything down and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
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


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children first found by their parent pid, recursively)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# What `nox -s demo` is to the demo: a parent that runs it and dies at SIGTERM without passing it
# on (nox has no SIGTERM handler, and a background job ignores SIGINT).
_PARENT = """
import subprocess, sys
demo = subprocess.Popen([sys.executable, "-m", "otterscale.testing.demo", "--dir", sys.argv[1]],
                        stdout=subprocess.DEVNULL, stderr=open(sys.argv[2], "wb"))
print(demo.pid, flush=True)
demo.wait()
"""


def test_the_demo_stops_everything_when_its_parent_dies(tmp_path: Path) -> None:
    """SIGTERM to the demo's parent (as to a backgrounded `nox -s demo`): the demo, its control
    plane, Keycloak, hub, agent and chisel all stop, in the demo's own orderly way."""
    workdir, stderr = tmp_path / "demo", tmp_path / "demo.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTTERSCALE_", "KUBECONFIG"))}
    if "OTTERSCALE_TOOLS_DIR" in os.environ:
        env["OTTERSCALE_TOOLS_DIR"] = os.environ["OTTERSCALE_TOOLS_DIR"]
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(workdir), str(stderr)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a signal to the test's own group must not reach it
    )
    started: set[int] = set()
    try:
        assert parent.stdout is not None
        demo = int(parent.stdout.readline())
        deadline = time.monotonic() + 240  # control plane + Keycloak on a busy 2-core machine
        while not (workdir / "demo.json").exists():
            assert parent.poll() is None, stderr.read_text()[-4000:]
            assert _alive(demo), stderr.read_text()[-4000:]
            assert time.monotonic() < deadline, f"the demo did not come up:\n{stderr.read_text()[-4000:]}"
            time.sleep(0.5)
        started = {demo, *_descendants(demo)}
        commands = {
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in started
        }
        for wanted in ("kube-apiserver", "java", "otterscale server", "otterscale agent", "chisel"):
            assert any(wanted in command for command in commands), (wanted, commands)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(10) == -signal.SIGTERM  # it died without passing anything on
        deadline = time.monotonic() + 120
        while left := {pid for pid in started if _alive(pid)}:
            assert time.monotonic() < deadline, f"still running after the parent died: {sorted(left)}"
            time.sleep(0.5)
    finally:
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=30)
    log = stderr.read_text()
    assert "stopping..." in log
    assert log.rstrip().endswith("stopped"), log[-2000:]
