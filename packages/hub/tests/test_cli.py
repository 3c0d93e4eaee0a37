"""``otterscale server`` as a separate OS process: start-up, errors, logs, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport

from otterscale.common import ChiselBinary
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import free_port, modules_loaded_by

from .conftest import FakeAgent, Issuer, make_specs, wait_for, write_config

BIN = Path(sys.executable).parent
OTTERSCALE = str(BIN / "otterscale")
OTTERSCALE_HUB = str(BIN / "otterscale-hub")


def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import subprocess

    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)
    return result.returncode, result.stdout, result.stderr


def test_help() -> None:
    code, out, _ = run(OTTERSCALE, "server", "--help")
    assert code == 0
    for flag in ("--address", "--config", "--chisel", "--log-format", "--drain-timeout"):
        assert flag in out
    code, out, _ = run(OTTERSCALE_HUB, "--help")
    assert code == 0
    code, out, _ = run(OTTERSCALE, "--help")
    assert code == 0
    assert "server" in out
    assert "otterscale-hub" in out


def test_launcher_and_hub_load_only_what_start_up_uses() -> None:
    # `otterscale server` only starts Envoy, where the hub runs: it loads none of the hub's modules.
    launcher = modules_loaded_by("from otterscale.hub._cli import build_parser\nbuild_parser()")
    assert not {"otterscale.hub._hub", "connectrpc", "pydantic", "kubernetes", "aiohttp"} & launcher
    # Inside Envoy, without --leader-elect: no Kubernetes client; aiohttp comes with the first
    # token to verify (it fetches the issuer's keys).
    hub = modules_loaded_by("import otterscale.hub._hosted")
    assert "otterscale.hub._hub" in hub
    assert not {"kubernetes", "aiohttp"} & hub


def test_missing_config(tmp_path: Path) -> None:
    code, _, err = run(OTTERSCALE, "server", "--config", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert "configuration file not found" in err


def test_bad_address() -> None:
    code, _, err = run(OTTERSCALE, "server", "--address", "nonsense")
    assert code == 2
    assert "invalid address" in err


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "otterscale.yaml",
        issuer_url="http://127.0.0.1:9/realms/down",
        specs=make_specs(("alpha",)),
        tunnel_port=free_port(),
    )


def test_missing_chisel(config_file: Path, tmp_path: Path) -> None:
    code, _, err = run(
        OTTERSCALE, "server", "--config", str(config_file), "--chisel", str(tmp_path / "chisel")
    )
    assert code == 1
    assert "does not exist" in err
    code, _, err = run(
        OTTERSCALE, "server", "--config", str(config_file), env={"PATH": str(tmp_path), "HOME": str(tmp_path)}
    )
    assert code == 1
    assert "chisel was not found on PATH" in err


def test_print_fingerprint(config_file: Path, chisel_binary: ChiselBinary) -> None:
    code, out, err = run(
        OTTERSCALE,
        "server",
        "--config",
        str(config_file),
        "--chisel",
        str(chisel_binary.path),
        "--print-fingerprint",
    )
    assert code == 0, err
    fingerprint = out.strip()
    assert len(fingerprint) == 44
    assert fingerprint.endswith("=")
    # Deterministic from the key seed: the same again.
    code, again, _ = run(
        OTTERSCALE,
        "server",
        "--config",
        str(config_file),
        "--chisel",
        str(chisel_binary.path),
        "--print-fingerprint",
    )
    assert again.strip() == fingerprint


def test_address_in_use(config_file: Path, chisel_binary: ChiselBinary) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(
            OTTERSCALE,
            "server",
            "--config",
            str(config_file),
            "--chisel",
            str(chisel_binary.path),
            "--address",
            f"127.0.0.1:{port}",
        )
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err


def test_tunnel_port_in_use(config_file: Path, chisel_binary: ChiselBinary) -> None:
    import socket

    import yaml

    document = yaml.safe_load(config_file.read_text())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        document["tunnel"]["server"]["port"] = taken.getsockname()[1]
        config_file.write_text(yaml.safe_dump(document))
        code, _, err = run(
            OTTERSCALE, "server", "--config", str(config_file), "--chisel", str(chisel_binary.path)
        )
    assert code == 1
    assert "chisel-server exited with status 1 before it was ready" in err
    assert "address already in use" in err


def test_too_old_chisel(config_file: Path, tmp_path: Path) -> None:
    old = tmp_path / "chisel"
    old.write_text("#!/bin/sh\necho 1.11.4\n")
    old.chmod(0o755)
    code, _, err = run(OTTERSCALE, "server", "--config", str(config_file), "--chisel", str(old))
    assert code == 1
    assert "older than the required 1.11.5" in err


@dataclass
class HubProcess:
    proc: asyncio.subprocess.Process
    url: str
    log: Path
    started_in: float

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


async def start_hub(
    config: Path,
    binary: ChiselBinary,
    log: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> HubProcess:
    """Start ``otterscale server`` on ``port`` (a free one by default; 0: the kernel picks it, and
    the URL comes from the hub's "ready at" log line); return once ``/readyz`` answers 200."""
    port = free_port() if port is None else port
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            OTTERSCALE,
            "server",
            "--address",
            f"127.0.0.1:{port}",
            "--config",
            str(config),
            "--chisel",
            str(binary.path),
            *extra,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env
            if env is not None
            else {"PATH": os.environ.get("PATH", ""), "OTTERSCALE_CONTAINER": "true"},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}" if port else ""
    transport = HTTPTransport()
    ready = False
    try:
        client = Client(transport)
        deadline = time.monotonic() + 30
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"hub exited with {proc.returncode}:\n{log.read_text()}")
            if not url:
                announced = re.search(r"ready at (http://127\.0\.0\.1:[1-9][0-9]*)", log.read_text())
                url = announced.group(1) if announced else ""
            try:
                response = await asyncio.wait_for(client.get(url + "/readyz"), 2) if url else None
                if response is not None and response.status == 200:
                    ready = True
                    break
            except Exception:  # noqa: S110 - not listening yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"hub not ready:\n{log.read_text()}")
            await asyncio.sleep(0.01)
    finally:
        await transport.aclose()
        if not ready:  # a hub that never got ready must not outlive the test (it holds ports)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return HubProcess(proc=proc, url=url, log=log, started_in=time.perf_counter() - started)


@pytest_asyncio.fixture
async def hub_process(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary
) -> AsyncIterator[tuple[HubProcess, dict[str, object], FakeAgent]]:
    specs = make_specs(("alpha",))
    tunnel_port = free_port()
    config = write_config(
        tmp_path / "otterscale.yaml", issuer_url=issuer.url, specs=specs, tunnel_port=tunnel_port
    )
    hub = await start_hub(config, chisel_binary, tmp_path / "hub.log")
    agent = FakeAgent(specs["alpha"], chisel_binary)
    try:
        fingerprint = next(line["fingerprint"] for line in hub.lines() if "fingerprint" in line)
        await agent.start()
        await agent.connect(f"http://127.0.0.1:{tunnel_port}", str(fingerprint))
        yield hub, {"tunnel_port": tunnel_port, "fingerprint": fingerprint}, agent
    finally:
        await agent.stop()
        if hub.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hub.proc.pid, signal.SIGKILL)
            await hub.proc.wait()


@pytest.mark.integration
async def test_hub_process_serves_logs_json_and_shuts_down_gracefully(
    hub_process: tuple[HubProcess, dict[str, object], FakeAgent], issuer: Issuer
) -> None:
    hub, info, _ = hub_process
    # Start-up (chisel and Envoy included) is measured by the benchmark (nox -s bench, spawn ->
    # ready); here only bounded, generously: a loaded 2-core CI box took 7 s.
    assert hub.started_in < 30, hub.started_in
    lines = hub.lines()
    assert lines, "container mode logs JSON"
    tunnel_line = next(line for line in lines if "fingerprint" in line)
    assert tunnel_line["tunnel_address"] == f"127.0.0.1:{info['tunnel_port']}"
    assert "listening on" in str(tunnel_line["message"])
    assert any("hub ready" in str(line["message"]) for line in lines)

    transport = HTTPTransport()
    client = ResourceServiceClient(hub.url, http_client=Client(transport))
    token = issuer.token("carol")
    auth = {"authorization": f"Bearer {token}"}
    try:
        transport_ready_deadline = time.monotonic() + 10
        while True:
            try:
                got = await client.get(pb.GetRequest(cluster="alpha", name="p"), headers=auth)
                break
            except ConnectError as exc:  # the hub learns of the tunnel from chisel's log
                if exc.code is not Code.UNAVAILABLE or time.monotonic() > transport_ready_deadline:
                    raise
                await asyncio.sleep(0.05)
        assert got.object["metadata"]["name"] == "p"

        received: list[str] = []

        async def consume() -> None:
            async for event in client.watch(
                pb.WatchRequest(cluster="alpha", resource="configmaps", resource_version="1"), headers=auth
            ):
                received.append(event.resource_version)

        watch = asyncio.create_task(consume())
        await wait_for(lambda: received == ["100"], 10, "first watch event")
        stopping = time.perf_counter()
        hub.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectError) as caught:
            await asyncio.wait_for(watch, 10)
        assert caught.value.code is Code.UNAVAILABLE
        assert "shutting down" in caught.value.message
        assert await asyncio.wait_for(hub.proc.wait(), 15) == 0
        assert time.perf_counter() - stopping < 5
    finally:
        await transport.aclose()
    # The whole process group is gone: chisel was stopped with the hub.
    with pytest.raises(ProcessLookupError):
        os.killpg(hub.proc.pid, 0)
    lines = hub.lines()
    access = [line for line in lines if line.get("logger") == "otterscale.hub.access"]
    assert any(
        line.get("subject") == "carol" and line.get("cluster") == "alpha" and line.get("code") == "ok"
        for line in access
    )
    assert all("request_id" in line and "duration_ms" in line for line in access)
    assert token not in hub.log.read_text()
    assert any("hub stopped" in str(line["message"]) for line in lines)


@pytest.mark.integration
async def test_hub_starts_while_the_identity_provider_is_down(
    config_file: Path, chisel_binary: ChiselBinary, tmp_path: Path, issuer: Issuer
) -> None:
    hub = await start_hub(config_file, chisel_binary, tmp_path / "hub.log")
    transport = HTTPTransport()
    try:
        client = ResourceServiceClient(hub.url, http_client=Client(transport))
        with pytest.raises(ConnectError) as caught:
            await client.get(
                pb.GetRequest(cluster="alpha", name="x"),
                headers={"authorization": f"Bearer {issuer.token()}"},
            )
        assert caught.value.code is Code.UNAVAILABLE
        assert "127.0.0.1:9" in caught.value.message
    finally:
        await transport.aclose()
        hub.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(hub.proc.wait(), 15) == 0


@pytest.mark.integration
async def test_a_hub_on_port_0_learns_the_port_the_kernel_picked(
    config_file: Path, chisel_binary: ChiselBinary, tmp_path: Path
) -> None:
    """``--address 127.0.0.1:0``: the launcher announces the port Envoy was given, and the hub
    inside Envoy learns it from Envoy's admin interface before it answers anything (it used to
    wait forever: its admin request spoke HTTP/1.0, which Envoy's admin refuses with 426)."""
    hub = await start_hub(config_file, chisel_binary, tmp_path / "hub.log", port=0)
    try:
        assert not hub.url.endswith(":0")
    finally:
        hub.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(hub.proc.wait(), 15) == 0


# --------------------------------------------------------------------------------------------------
# Leader election flags


def test_leader_election_flags_are_documented() -> None:
    code, out, _ = run(OTTERSCALE, "server", "--help")
    assert code == 0
    for flag in (
        "--leader-elect",
        "--no-leader-elect",
        "--leader-elect-lease-name",
        "--leader-elect-namespace",
        "--leader-elect-lease-duration",
        "--leader-elect-renew-deadline",
        "--leader-elect-retry-period",
        "--leader-label",
        "--kubeconfig",
        "POD_NAME",
        "POD_NAMESPACE",
    ):
        assert flag in out, flag


def test_election_settings_from_flags_and_environment() -> None:
    from otterscale.hub._cli import build_parser, election_settings

    parser = build_parser()
    assert election_settings(parser.parse_args([]), {"POD_NAMESPACE": "ns"}) is None
    settings = election_settings(
        parser.parse_args(["--leader-elect", "--leader-elect-retry-period", "1.5"]),
        {"POD_NAME": "hub-7d9f-abcde", "POD_NAMESPACE": "otterscale"},
    )
    assert settings is not None
    assert (settings.identity, settings.pod_name, settings.namespace) == (
        "hub-7d9f-abcde",
        "hub-7d9f-abcde",
        "otterscale",
    )
    assert (settings.lease_name, settings.leader_label) == (
        "otterscale-server-leader",
        "otterscale.io/leader",
    )
    assert (settings.lease_duration, settings.renew_deadline, settings.retry_period) == (15.0, 10.0, 1.5)
    # Outside a Pod: the host name plus a random suffix, and no Pod to label.
    import socket

    first = election_settings(parser.parse_args(["--leader-elect"]), {"POD_NAMESPACE": "ns"})
    second = election_settings(parser.parse_args(["--leader-elect"]), {"POD_NAMESPACE": "ns"})
    assert first is not None
    assert second is not None
    assert first.pod_name is None
    assert first.identity.startswith(socket.gethostname() + "_")
    assert first.identity != second.identity
    explicit = election_settings(
        parser.parse_args(["--leader-elect", "--leader-elect-namespace", "other"]), {"POD_NAMESPACE": "ns"}
    )
    assert explicit is not None
    assert explicit.namespace == "other"


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        ((), {}, "needs the Lease's namespace: set POD_NAMESPACE"),
        (("--address", "127.0.0.1:0"), {"POD_NAMESPACE": "ns"}, "needs a fixed --address port"),
        (
            ("--leader-elect-renew-deadline", "20"),
            {"POD_NAMESPACE": "ns"},
            "the lease duration (15s) must exceed the renew deadline (20s)",
        ),
        (("--leader-elect-retry-period", "0.5"), {"POD_NAMESPACE": "ns"}, "retry period must be at least 1s"),
    ],
)
def test_leader_election_usage_errors(
    config_file: Path, tmp_path: Path, extra: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    code, _, err = run(
        OTTERSCALE,
        "server",
        "--config",
        str(config_file),
        "--leader-elect",
        *extra,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **env},
    )
    assert code == 2, err
    assert message in err


def test_leader_election_without_kubernetes_credentials(
    config_file: Path, chisel_binary: ChiselBinary, tmp_path: Path
) -> None:
    code, _, err = run(
        OTTERSCALE,
        "server",
        "--config",
        str(config_file),
        "--chisel",
        str(chisel_binary.path),
        "--address",
        f"127.0.0.1:{free_port()}",
        "--leader-elect",
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "POD_NAMESPACE": "ns"},
    )
    assert code == 1, err
    assert "leader election needs the Kubernetes API" in err
