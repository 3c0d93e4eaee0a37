"""``otterscale agent``: flags and configuration, and (integration) the real process: /ping, a
call through it, and a graceful SIGTERM that ends an open Watch with unavailable.

The tunnel's flags and behaviour are tested in test_tunnel.py; here the agent runs with
``--no-tunnel`` unless a test is about the tunnel settings."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.agent import build_parser
from otterscale.agent._cli import main, settings_from_args
from otterscale.common import ConfigError, UsageError, derive_identity_key
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane, free_port, modules_loaded_by, tool_path

from .conftest import AGENT_PASSWORD, CLUSTER, ClientFactory

#: A well-formed tunnel fingerprint (no server has it: nothing here connects).
FINGERPRINT = "RozKA4FDnJ+PXdPyD91by+mZkKj1ZoR3fFIwffROzNo="

CONFIG = f"""
keycloak:
  realm_url: https://keycloak.example.com/realms/otterscale
  client_id: otterscale
tunnel:
  server:
    host: 127.0.0.1
    port: 8300
clusters:
  {CLUSTER}:
    agent:
      auth:
        user: {CLUSTER}-agent
        pass: {AGENT_PASSWORD}
      fingerprint: "{FINGERPRINT}"
      tunnel_port: 51001
      api_port: API_PORT
  other:
    agent:
      auth:
        user: other-agent
        pass: other-password-0123456789-0123456789
      tunnel_port: 51002
      api_port: 8299
"""


def write_config(tmp_path: Path, api_port: int = 18299) -> Path:
    path = tmp_path / "otterscale.yaml"
    path.write_text(CONFIG.replace("API_PORT", str(api_port)))
    return path


def test_settings_from_flags_and_config(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    settings, level, fmt = settings_from_args(
        [
            "--cluster",
            CLUSTER,
            "--config",
            str(config),
            "--address",
            "127.0.0.1:9000",
            "--kubeconfig",
            "/k",
            "--log-level",
            "debug",
            "--chisel",
            str(tool_path("chisel")),
        ],
        {},
    )
    assert (settings.cluster, settings.host, settings.port, settings.kubeconfig) == (
        CLUSTER,
        "127.0.0.1",
        9000,
        "/k",
    )
    assert settings.identity_key == derive_identity_key(CLUSTER, AGENT_PASSWORD)
    assert (level, fmt) == ("debug", "text")
    assert AGENT_PASSWORD not in repr(settings)
    tunnel = settings.tunnel
    assert tunnel is not None
    assert (tunnel.server_url, tunnel.fingerprint, tunnel.user, tunnel.tunnel_port) == (
        "http://127.0.0.1:8300",
        FINGERPRINT,
        f"{CLUSTER}-agent",
        51001,
    )
    assert tunnel.chisel.version >= (1, 11, 5)


def test_port_zero_means_api_port(tmp_path: Path) -> None:
    settings, _, _ = settings_from_args(
        [
            "--cluster",
            CLUSTER,
            "--config",
            str(write_config(tmp_path, 18555)),
            "--address",
            ":0",
            "--no-tunnel",
        ],
        {},
    )
    assert (settings.host, settings.port) == ("", 18555)
    assert settings.tunnel is None


def test_discovery_ttl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--cluster", CLUSTER, "--config", str(write_config(tmp_path)), "--no-tunnel"]
    settings, _, _ = settings_from_args(argv, {})
    assert settings.discovery_ttl == 10.0
    settings, _, _ = settings_from_args([*argv, "--discovery-ttl", "600"], {})
    assert settings.discovery_ttl == 600.0
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SystemExit) as info:
            settings_from_args([*argv, "--discovery-ttl", bad], {})
        assert info.value.code == 2
        assert "--discovery-ttl" in capsys.readouterr().err


def test_container_mode_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_args(["--cluster", CLUSTER], {"OTTERSCALE_CONTAINER": "true"})
    assert "/etc/app/otterscale.yaml" in str(info.value)


def test_unknown_cluster(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"clusters\.nope: no such cluster"):
        settings_from_args(["--cluster", "nope", "--config", str(write_config(tmp_path))], {})


def test_bad_address(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        settings_from_args(
            ["--cluster", CLUSTER, "--config", str(write_config(tmp_path)), "--address", "nonsense"], {}
        )


def test_cluster_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([])
    assert info.value.code == 2
    assert "--cluster" in capsys.readouterr().err


def test_launcher_loads_no_agent_module() -> None:
    # `otterscale agent` only starts Envoy, where the agent runs and imports its modules itself:
    # loading them in the launcher too cost about a second of every start (and of --help).
    loaded = modules_loaded_by(
        "from otterscale.agent._cli import build_parser\nbuild_parser().parse_args(['--cluster', 'x'])"
    )
    heavy = {"otterscale.agent._agent", "kubernetes", "aiohttp", "pydantic", "connectrpc", "cryptography"}
    assert not heavy & loaded
    assert "otterscale.agent._cli" in loaded


def test_main_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cluster", CLUSTER, "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "configuration file not found" in capsys.readouterr().err


def test_help_explains(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for fragment in (
        "--kubeconfig",
        "KUBECONFIG",
        "in-cluster",
        "OTTERSCALE_CONTAINER",
        "/ping",
        "/readyz",
        "SIGTERM",
        "impersonat",
        "--chisel",
        "--tunnel-server-url",
        "--no-tunnel",
        "fingerprint",
        "AUTH",
    ):
        assert fragment in out


def test_otterscale_command_dispatches_to_agent() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from otterscale.common._cli import main; raise SystemExit(main())",
            "agent",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--cluster NAME" in result.stdout


def _ping(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=2) as resp:  # noqa: S310
            return int(resp.status)
    except (urllib.error.URLError, ConnectionError):
        return None


def _get_request(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


@pytest.mark.integration
async def test_process_serves_and_stops_gracefully(
    tmp_path: Path, control_plane: ControlPlane, make_client: ClientFactory, namespace: str
) -> None:
    port = free_port()
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "OTTERSCALE_CONTAINER")}
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "otterscale.agent",
            "--cluster",
            CLUSTER,
            "--config",
            str(config),
            "--address",
            f"127.0.0.1:{port}",
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--no-tunnel",
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(_ping, url) != 204:
            assert proc.returncode is None, log_path.read_text()
            assert time.monotonic() < deadline, "agent did not answer /ping within 30s"
            await asyncio.sleep(0.1)
        assert await asyncio.to_thread(_get, url + "/readyz") == (200, "ok\n")  # no tunnel: ready

        rpc = make_client(url=url, transport="grpc-h2c")
        listed = await rpc.list(
            pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace)
        )
        first_event = asyncio.Event()

        async def watch() -> None:
            async for _ in rpc.watch(
                pb.WatchRequest(
                    cluster=CLUSTER,
                    version="v1",
                    resource="configmaps",
                    namespace=namespace,
                    resource_version=listed.resource_version,
                )
            ):
                first_event.set()

        task = asyncio.create_task(watch())
        control_plane.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "poke"}},
        )
        await asyncio.wait_for(first_event.wait(), 30)  # the watch is open end to end

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectError) as info:
            await asyncio.wait_for(task, 10)
        assert info.value.code is Code.UNAVAILABLE
        assert "shutting down" in info.value.message
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert time.monotonic() - started < 5, "graceful shutdown took too long"
        text = log_path.read_text()
        assert "SIGTERM received" in text
        assert "agent stopped" in text
        assert "Traceback" not in text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.integration
def test_ping(agent_server: object) -> None:
    url = agent_server.url  # type: ignore[attr-defined]
    with urllib.request.urlopen(url + "/ping", timeout=5) as resp:  # noqa: S310
        assert resp.status == 204
        assert resp.read() == b""
    request = urllib.request.Request(url + "/ping", data=b"", method="POST")  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)  # noqa: S310
    info.value.close()
    assert info.value.code == 405
    # Without a tunnel (--no-tunnel) the agent is ready while it serves.
    assert _get(url + "/readyz") == (200, "ok\n")
    head = urllib.request.Request(url + "/readyz", method="HEAD")  # noqa: S310
    with urllib.request.urlopen(head, timeout=5) as resp:  # noqa: S310
        assert (resp.status, resp.read()) == (200, b"")
    post = urllib.request.Request(url + "/readyz", data=b"", method="POST")  # noqa: S310
    assert _get_request(post) == 405
