"""The hub's chisel tunnel server with real chisel clients: authfile, environment, isolation, restarts.

The hub is an ``otterscale server`` process; its chisel server is found among its children (argv,
environment, authfile read through ``/proc``), and its view of each cluster is what it reports
(``/metrics``, ListClusters). "Agents" here are real ``chisel client`` processes (through
``ChiselClient`` or raw argv); the API behind a tunnel is the test-only fake agent of conftest.py
where one is needed.
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

from .conftest import KEY_SEED, HubEnv, HubFactory, eventually, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.security]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if item)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _authfile(pid: int) -> Path:
    argv = _cmdline(pid)
    return Path(argv[argv.index("--authfile") + 1])


async def last_error(hub_env: HubEnv, cluster: str) -> str:
    """The cluster's last tunnel error as the hub reports it (ListClusters)."""
    return (await hub_env.clusters())[cluster].last_error


async def test_authfile_is_private_and_anchored(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    chisel = hub_env.hub.chisel_pid()
    assert chisel is not None
    authfile = _authfile(chisel)
    mode = stat.S_IMODE(authfile.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(authfile.parent.stat().st_mode) == 0o700
    users = json.loads(authfile.read_text())
    expected = {
        f"{spec.user}:{spec.password}": [f"^R:127\\.0\\.0\\.1:{spec.tunnel_port}$"]
        for spec in hub_env.specs.values()
    }
    assert users == expected


async def test_chisel_server_environment_is_clean(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    chisel = hub_env.hub.chisel_pid()
    assert chisel is not None
    environ = _environ(chisel)
    # Only the key seed, deliberately (an environment is private; argv is not).
    assert environ == {"CHISEL_KEY": KEY_SEED}
    argv = _cmdline(chisel)
    assert KEY_SEED not in " ".join(argv)
    assert "--reverse" in argv
    assert "--authfile" in argv
    for spec in hub_env.specs.values():
        assert spec.password not in " ".join(argv)


async def test_hub_logs_fingerprint_and_address(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    assert len(hub_env.hub.fingerprint) == 44
    (listening,) = [r for r in hub_env.hub.log_records() if "tunnel_address" in r]
    assert listening["tunnel_address"] == f"127.0.0.1:{hub_env.tunnel_port}"
    assert listening["fingerprint"] == hub_env.hub.fingerprint
    # and it listens there
    _, writer = await asyncio.open_connection("127.0.0.1", hub_env.tunnel_port)
    writer.close()
    await writer.wait_closed()


async def test_inherited_auth_host_port_do_not_reach_chisel(hub_env_factory: HubFactory) -> None:
    """A hub started with AUTH/HOST/PORT in its own environment must not pass them on to chisel,
    neither at start nor when its supervisor restarts chisel."""
    from otterscale.testing import service_env

    hub_env = await hub_env_factory(
        env=service_env({"AUTH": "intruder:intruder", "HOST": "192.0.2.1", "PORT": "1"})
    )
    old = hub_env.hub.chisel_pid()
    assert old is not None
    assert _environ(old) == {"CHISEL_KEY": KEY_SEED}
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: hub_env.hub.chisel_pid() not in (None, old), 15, "chisel restarted")
    new = hub_env.hub.chisel_pid()
    assert new is not None
    assert _environ(new) == {"CHISEL_KEY": KEY_SEED}
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
        await wait_for(lambda: intruder.state.last_error is not None, 15, "intruder refused")
        assert "refused the agent's credentials" in (intruder.state.last_error or "")
        assert not intruder.connected
    finally:
        await intruder.stop()


async def test_agent_of_one_cluster_cannot_open_another_clusters_port(hub_env: HubEnv) -> None:
    alpha, beta = hub_env.specs["alpha"], hub_env.specs["beta"]
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

        async def recorded() -> bool:
            return bool(await last_error(hub_env, "beta"))

        await eventually(recorded, 10, "beta's last error")
        status = (await hub_env.clusters())["beta"]
        assert not status.connected
        assert "another cluster's agent user" in status.last_error
        # Nothing listens on beta's port.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", beta.tunnel_port)
    finally:
        await thief.stop()


async def test_client_initiated_forward_tunnel_is_refused(shared_hub_env: HubEnv) -> None:
    """An agent's credentials cannot be used to reach anything on the hub's side (forward remote)."""
    hub_env = shared_hub_env
    alpha = hub_env.specs["alpha"]
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

        async def recorded() -> bool:
            return bool(await last_error(hub_env, "alpha"))

        await eventually(recorded, 15, "login failure recorded")
        error = await last_error(hub_env, "alpha")
        assert "tunnel login refused" in error
        assert "wrong-password" not in error
        assert "wrong-password" not in hub_env.hub.log()
    finally:
        await client.stop()


async def test_second_agent_for_the_same_cluster_is_refused(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    alpha = hub_env.specs["alpha"]
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
        assert hub_env.hub.connected("alpha")  # the first agent keeps its tunnel
        got = await hub_env.client().get(pb.GetRequest(cluster="alpha", name="still"), headers=hub_env.auth())
        assert got.object["metadata"]["name"] == "still"
    finally:
        await second.stop()


async def test_chisel_restarts_after_kill_and_agents_come_back(hub_env: HubEnv) -> None:
    agent = await hub_env.agent("alpha")
    hub = hub_env.hub
    client = hub_env.client()
    await client.get(pb.GetRequest(cluster="alpha", name="before"), headers=hub_env.auth())
    old = hub.chisel_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await hub.wait_connected("alpha", False, within=10)  # alpha down after the kill
    with pytest.raises(ConnectError) as caught:
        await client.get(pb.GetRequest(cluster="alpha", name="during"), headers=hub_env.auth())
    assert caught.value.code is Code.UNAVAILABLE

    async def restarted() -> bool:
        metrics = await hub_env.metrics()
        return (
            metrics.get("otterscale_hub_chisel_restarts_total") == 1
            and metrics.get("otterscale_hub_chisel_up") == 1
        )

    await eventually(restarted, 15, "chisel restarted")
    assert hub.chisel_pid() not in (None, old)
    # The agent's chisel client reconnects on its own (retry interval 1 s). It insists on the
    # fingerprint the hub logged at start-up (--fingerprint is exact): the restarted server has
    # the same one (same key seed), so agents keep trusting it.
    assert await agent.wait_connected(15)
    await hub.wait_connected("alpha", True, within=15)
    got = await client.get(pb.GetRequest(cluster="alpha", name="after"), headers=hub_env.auth())
    assert got.object["metadata"]["name"] == "after"
