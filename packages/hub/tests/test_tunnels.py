"""The hub's chisel tunnel server with real chisel clients: authfile, environment, isolation, restarts.

"Agents" here are real ``chisel client`` processes (through ``ChiselClient`` or raw argv); the
API behind a tunnel is the test-only fake agent of conftest.py where one is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from pathlib import Path

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import ChiselClient, ProcessSpec, Supervisor, parse_client_line
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import free_port

from .conftest import KEY_SEED, HubEnv, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.security]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if item)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def test_authfile_is_private_and_anchored(hub_env: HubEnv) -> None:
    chisel = hub_env.hub.chisel
    assert chisel is not None
    assert chisel.authfile is not None
    mode = stat.S_IMODE(chisel.authfile.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(chisel.authfile.parent.stat().st_mode) == 0o700
    users = json.loads(chisel.authfile.read_text())
    expected = {
        f"{spec.user}:{spec.password}": [f"^R:127\\.0\\.0\\.1:{spec.tunnel_port}$"]
        for spec in hub_env.specs.values()
    }
    assert users == expected


async def test_chisel_server_environment_is_clean(hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    chisel = hub_env.hub.chisel
    assert chisel is not None
    assert chisel.pid is not None
    environ = _environ(chisel.pid)
    # Only the key seed, deliberately (an environment is private; argv is not).
    assert environ == {"CHISEL_KEY": KEY_SEED}
    argv = _cmdline(chisel.pid)
    assert KEY_SEED not in " ".join(argv)
    assert "--reverse" in argv
    assert "--authfile" in argv
    for spec in hub_env.specs.values():
        assert spec.password not in " ".join(argv)


async def test_hub_logs_fingerprint_and_address(hub_env: HubEnv) -> None:
    assert hub_env.hub.fingerprint is not None
    assert len(hub_env.hub.fingerprint) == 44
    chisel = hub_env.hub.chisel
    assert chisel is not None
    assert chisel.url == f"http://127.0.0.1:{hub_env.tunnel_port}"


async def test_inherited_auth_host_port_do_not_reach_chisel(
    hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hub started with AUTH/HOST/PORT in its own environment must not pass them on: restart
    # chisel (kill it; the supervisor starts a new one) with them set in this process.
    monkeypatch.setenv("AUTH", "intruder:intruder")
    monkeypatch.setenv("HOST", "192.0.2.1")
    monkeypatch.setenv("PORT", "1")
    chisel = hub_env.hub.chisel
    assert chisel is not None
    old = chisel.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: chisel.pid not in (None, old) and chisel.running, 15, "chisel restarted")
    assert chisel.pid is not None
    assert _environ(chisel.pid) == {"CHISEL_KEY": KEY_SEED}
    # The intruder's credentials are not accepted.
    intruder = ChiselClient(
        hub_env.binary,
        server_url=hub_env.tunnel_url,
        fingerprint=hub_env.hub.fingerprint,
        user="intruder",
        password="intruder",
        tunnel_port=hub_env.specs["alpha"].tunnel_port,
        api_port=hub_env.specs["alpha"].api_port,
        max_retry_interval=1.0,
    )
    await intruder.start()
    try:
        await wait_for(lambda: intruder.state.last_error is not None, 10, "intruder refused")
        assert "refused the agent's credentials" in (intruder.state.last_error or "")
        assert not intruder.connected
    finally:
        await intruder.stop()


async def test_agent_of_one_cluster_cannot_open_another_clusters_port(hub_env: HubEnv) -> None:
    alpha, beta = hub_env.specs["alpha"], hub_env.specs["beta"]
    assert hub_env.hub.fingerprint is not None
    thief = ChiselClient(
        hub_env.binary,
        server_url=hub_env.tunnel_url,
        fingerprint=hub_env.hub.fingerprint,
        user=alpha.user,
        password=alpha.password,
        tunnel_port=beta.tunnel_port,
        api_port=alpha.api_port,
        max_retry_interval=1.0,
    )
    await thief.start()
    try:
        await wait_for(lambda: thief.state.last_error is not None, 10, "refused")
        assert "refused the reverse remote" in (thief.state.last_error or "")
        assert not thief.connected
        tunnels = hub_env.hub.tunnels
        assert tunnels is not None
        await wait_for(lambda: tunnels.get("beta").last_error is not None, 5, "beta last_error")  # type: ignore[union-attr]
        status = tunnels.get("beta")
        assert status is not None
        assert not status.connected
        assert "another cluster's agent user" in (status.last_error or "")
        # Nothing listens on beta's port.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", beta.tunnel_port)
    finally:
        await thief.stop()


async def test_client_initiated_forward_tunnel_is_refused(hub_env: HubEnv, tmp_path: Path) -> None:
    """An agent's credentials cannot be used to reach anything on the hub's side (forward remote)."""
    alpha = hub_env.specs["alpha"]
    assert hub_env.hub.fingerprint is not None
    errors: list[str] = []

    def on_line(line: str) -> None:
        event = parse_client_line(line)
        if event is not None and event.detail and event.kind.value == "error":
            errors.append(event.detail)

    # A forward remote (local 127.0.0.1:<port> -> hub-side 127.0.0.1:<tunnel server port>) and SOCKS.
    for remote in (
        f"127.0.0.1:{free_port()}:127.0.0.1:{hub_env.tunnel_port}",
        f"127.0.0.1:{free_port()}:socks",
    ):
        errors.clear()
        process = Supervisor(
            ProcessSpec(
                name="chisel-forward",
                argv=[
                    str(hub_env.binary.path),
                    "client",
                    "-v",
                    "--fingerprint",
                    hub_env.hub.fingerprint,
                    "--max-retry-interval",
                    "1s",
                    hub_env.tunnel_url,
                    remote,
                ],
                env={"AUTH": f"{alpha.user}:{alpha.password}"},
            ),
            on_output=on_line,
        )
        await process.start()
        try:
            await wait_for(lambda: bool(errors), 10, "forward refused")
            assert "denied" in errors[0], errors
        finally:
            await process.stop()


async def test_wrong_password_is_recorded_for_the_cluster(hub_env: HubEnv) -> None:
    alpha = hub_env.specs["alpha"]
    assert hub_env.hub.fingerprint is not None
    client = ChiselClient(
        hub_env.binary,
        server_url=hub_env.tunnel_url,
        fingerprint=hub_env.hub.fingerprint,
        user=alpha.user,
        password="wrong-password",
        tunnel_port=alpha.tunnel_port,
        api_port=alpha.api_port,
        max_retry_interval=1.0,
    )
    await client.start()
    try:
        tunnels = hub_env.hub.tunnels
        assert tunnels is not None
        await wait_for(lambda: tunnels.get("alpha").last_error is not None, 10, "login failure recorded")  # type: ignore[union-attr]
        status = tunnels.get("alpha")
        assert status is not None
        assert "tunnel login refused" in (status.last_error or "")
        assert "wrong-password" not in (status.last_error or "")
    finally:
        await client.stop()


async def test_second_agent_for_the_same_cluster_is_refused(hub_env: HubEnv) -> None:
    await hub_env.agent("alpha")
    alpha = hub_env.specs["alpha"]
    assert hub_env.hub.fingerprint is not None
    second = ChiselClient(
        hub_env.binary,
        server_url=hub_env.tunnel_url,
        fingerprint=hub_env.hub.fingerprint,
        user=alpha.user,
        password=alpha.password,
        tunnel_port=alpha.tunnel_port,
        api_port=alpha.api_port,
        max_retry_interval=1.0,
    )
    await second.start()
    try:
        await wait_for(lambda: second.state.last_error is not None, 10, "second refused")
        assert "busy" in (second.state.last_error or "")
        tunnels = hub_env.hub.tunnels
        assert tunnels is not None
        status = tunnels.get("alpha")
        assert status is not None
        assert status.connected  # the first agent keeps its tunnel
    finally:
        await second.stop()


async def test_chisel_restarts_after_kill_and_agents_come_back(hub_env: HubEnv) -> None:
    agent = await hub_env.agent("alpha")
    hub = hub_env.hub
    assert hub.chisel is not None
    assert hub.tunnels is not None
    assert hub.metrics is not None
    client = hub_env.client()
    await client.get(pb.GetRequest(cluster="alpha", name="before"), headers=hub_env.auth())
    old = hub.chisel.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: not hub.tunnels.get("alpha").connected, 5, "alpha down after the kill")  # type: ignore[union-attr]
    with pytest.raises(ConnectError) as caught:
        await client.get(pb.GetRequest(cluster="alpha", name="during"), headers=hub_env.auth())
    assert caught.value.code is Code.UNAVAILABLE
    await wait_for(lambda: hub.chisel.restarts == 1 and hub.chisel.running, 15, "chisel restarted")  # type: ignore[union-attr]
    assert hub.chisel.pid != old
    assert hub.metrics.chisel_restarts._value.get() == 1
    # The agent's chisel client reconnects on its own (retry interval 1 s).
    assert agent.tunnel is not None
    assert await agent.tunnel.wait_connected(15)
    await wait_for(lambda: hub.tunnels.get("alpha").connected, 10, "alpha back")  # type: ignore[union-attr]
    got = await client.get(pb.GetRequest(cluster="alpha", name="after"), headers=hub_env.auth())
    assert got.object["metadata"]["name"] == "after"
    # The same fingerprint after the restart (same key seed): agents keep trusting it.
    assert hub.chisel.fingerprint == hub.fingerprint
