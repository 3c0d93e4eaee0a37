"""`pip install otterscale-hub` / `otterscale-agent` from the built wheels gives working commands.

Each distribution goes into its own fresh virtualenv (nothing of the repository on the path),
then its commands run as a user would run them: ``--help``, the hub started with the README's
sample configuration (without chisel: it must say so and how to get it; with chisel: it serves
``/healthz`` and stops on SIGTERM), the agent refusing a cluster the configuration lacks.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from otterscale.testing import free_port, tool_path
from otterscale.testing.images import SAMPLE_CONFIG

pytestmark = pytest.mark.integration

# The sample otterscale.yaml of the original service (SAMPLE_CONFIG, shared with the image check
# of `nox -s images`), verbatim but for the ports, which are replaced by free ones so the test
# cannot collide with anything on the machine, and its example secrets, which the services refuse
# (too short, and published): replaced by generated ones.


SEED = secrets.token_urlsafe(32)
PASSWORD = secrets.token_urlsafe(32)


def _sample_config(directory: Path) -> Path:
    text = SAMPLE_CONFIG.replace('host: "0.0.0.0"', 'host: "127.0.0.1"')
    text = text.replace('port: "8300"', f'port: "{free_port()}"').replace("51001", str(free_port()))
    text = text.replace('"change-me"', f'"{SEED}"').replace('"dev-agent-password"', f'"{PASSWORD}"')
    path = directory / "otterscale.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# otterscale-hub


def test_hub_wheel_gives_the_otterscale_server_command(make_venv: Any) -> None:
    venv = make_venv("otterscale-hub")
    top = venv.run("otterscale", "--help")
    assert top.returncode == 0, top.stderr
    assert "server" in top.stdout
    assert "otterscale-hub" in top.stdout
    assert "not installed: pip install otterscale-agent" in top.stdout

    server = venv.run("otterscale", "server", "--help")
    assert server.returncode == 0, server.stderr
    for flag in ("--address", "--config", "--chisel", "--log-format"):
        assert flag in server.stdout
    assert venv.run("otterscale-hub", "--help").returncode == 0

    agent = venv.run("otterscale", "agent", "--cluster", "dev")
    assert agent.returncode == 2
    assert "pip install otterscale-agent" in agent.stderr


def test_hub_without_chisel_says_how_to_get_it(make_venv: Any, tmp_path: Path) -> None:
    venv = make_venv("otterscale-hub")
    config = _sample_config(tmp_path)
    started = time.monotonic()
    result = subprocess.run(
        [str(venv.bin / "otterscale"), "server", f"--address=127.0.0.1:{free_port()}", f"--config={config}"],
        capture_output=True,
        text=True,
        env=venv.env(),  # PATH: the venv and the system only, no chisel
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert elapsed < 15, f"took {elapsed:.1f}s to report a missing binary"
    message = result.stderr.lower()
    assert "chisel" in message, result.stderr
    assert "not found" in message, result.stderr
    assert "go install github.com/jpillora/chisel@" in result.stderr  # how to get it
    assert "--chisel" in result.stderr  # or where to point the hub
    assert "Traceback" not in result.stderr


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_hub_with_chisel_serves_health_and_stops_on_sigterm(make_venv: Any, tmp_path: Path) -> None:
    venv = make_venv("otterscale-hub")
    config = _sample_config(tmp_path)
    port = free_port()
    log = tmp_path / "hub.log"
    with log.open("wb") as out:
        hub = subprocess.Popen(
            [str(venv.bin / "otterscale"), "server", f"--address=127.0.0.1:{port}", f"--config={config}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=venv.env(extra_path=(tool_path("chisel").parent,)),
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert hub.poll() is None, f"the hub exited with {hub.returncode}:\n{log.read_text()}"
            try:
                if _get(f"http://127.0.0.1:{port}/healthz") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /healthz within 60s:\n{log.read_text()}"
            time.sleep(0.1)
        assert _get(f"http://127.0.0.1:{port}/readyz") == 200  # serving, tunnel server up
        assert "fingerprint" in log.read_text().lower()  # the README promises it at start-up
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout=30) == 0, log.read_text()
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait()
    text = log.read_text()
    assert SEED not in text
    assert PASSWORD not in text
    assert "Traceback" not in text


# --------------------------------------------------------------------------------------------------
# otterscale-agent


def test_agent_wheel_gives_the_otterscale_agent_command(make_venv: Any, tmp_path: Path) -> None:
    venv = make_venv("otterscale-agent")
    top = venv.run("otterscale", "--help")
    assert top.returncode == 0, top.stderr
    assert "agent" in top.stdout
    assert "otterscale-agent" in top.stdout
    assert "not installed: pip install otterscale-hub" in top.stdout

    agent = venv.run("otterscale", "agent", "--help")
    assert agent.returncode == 0, agent.stderr
    for flag in ("--cluster", "--address", "--config", "--kubeconfig"):
        assert flag in agent.stdout
    assert venv.run("otterscale-agent", "--help").returncode == 0

    server = venv.run("otterscale", "server")
    assert server.returncode == 2
    assert "pip install otterscale-hub" in server.stderr

    # The README's sample configuration, and a cluster it does not have: a clear refusal.
    config = _sample_config(tmp_path)
    wrong = venv.run("otterscale", "agent", "--cluster=prod", f"--config={config}")
    assert wrong.returncode == 1
    assert "no such cluster" in wrong.stderr
    assert "dev" in wrong.stderr
    assert "Traceback" not in wrong.stderr
