"""The agent's tunnel: the real ``otterscale agent`` process, a real chisel server (as the hub runs
it: common's ChiselServer with an authfile allowing only ``^R:127\\.0\\.0\\.1:<tunnel_port>$``) and
the session's real control plane.

Covered: connect and serve through the tunnel (``/ping`` and a real RPC on the hub's side of the
tunnel), ``/readyz`` following the tunnel, reconnect times after a hub-side restart and kill
(printed), a crashed chisel client restarted, wrong fingerprint and wrong password (never
connected, logged), a missing fingerprint (refused at start-up), the password kept out of argv
and logs, and no chisel left behind by SIGTERM or SIGKILL of the agent. Flag and log-logic tests
at the end need no processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from otterscale.agent import TunnelSettings
from otterscale.agent._cli import main, settings_from_args
from otterscale.agent._tunnel import Tunnel, default_server_url, target_host
from otterscale.common import (
    ChiselBinary,
    ChiselClientState,
    ChiselServer,
    ChiselServerEvent,
    ConfigError,
    ServerEventKind,
    TunnelError,
    TunnelUser,
    UsageError,
    check_chisel,
)
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import AgentProcess as ServiceAgent
from otterscale.testing import ControlPlane, free_port, http_get, tool_path

from .conftest import AGENT_PASSWORD, CLUSTER, ClientFactory

USER = f"{CLUSTER}-agent"
SEED = "otterscale-agent-tunnel-tests"
WRONG_FINGERPRINT = "A" * 43 + "="
#: How quickly the agent must notice a lost tunnel and be back once the hub is (retry cap 2 s).
WITHIN = 5.0


# --------------------------------------------------------------------------------------------------
# The hub's side: a real chisel server


class HubTunnel:
    """A chisel server as the hub runs it, for one cluster; can be stopped and started again."""

    def __init__(self, binary: ChiselBinary) -> None:
        self.binary = binary
        self.port = free_port()
        self.tunnel_port = free_port()
        self.events: list[ChiselServerEvent] = []
        self.server: ChiselServer | None = None
        self.fingerprint = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tunnel_url(self) -> str:
        """Where the hub reaches the agent."""
        return f"http://127.0.0.1:{self.tunnel_port}"

    async def start(self) -> None:
        self.server = ChiselServer(
            self.binary,
            host="127.0.0.1",
            port=self.port,
            users=[TunnelUser(USER, AGENT_PASSWORD, self.tunnel_port)],
            key_seed=SEED,
            on_event=self.events.append,
            backoff_initial=0.1,
        )
        await self.server.start()
        assert self.server.fingerprint is not None
        self.fingerprint = self.server.fingerprint

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    def saw(self, kind: ServerEventKind) -> bool:
        return any(event.kind is kind for event in self.events)


@pytest.fixture(scope="module")
def chisel() -> ChiselBinary:
    return check_chisel(tool_path("chisel"))


@pytest_asyncio.fixture
async def hub(chisel: ChiselBinary) -> AsyncIterator[HubTunnel]:
    tunnel = HubTunnel(chisel)
    await tunnel.start()
    try:
        yield tunnel
    finally:
        await tunnel.stop()


# --------------------------------------------------------------------------------------------------
# The agent: the real process


def write_config(
    path: Path,
    hub: HubTunnel,
    *,
    fingerprint: str | None,
    password: str = AGENT_PASSWORD,
    api_port: int = 8299,
) -> Path:
    agent: dict[str, Any] = {
        "auth": {"user": USER, "pass": password},
        "tunnel_port": hub.tunnel_port,
        "api_port": api_port,
    }
    if fingerprint is not None:
        agent["fingerprint"] = fingerprint
    config = {
        "keycloak": {"realm_url": "https://keycloak.invalid/realms/unused", "client_id": "unused"},
        # The hub's bind address: the agent's default tunnel server URL comes from it.
        "tunnel": {"server": {"host": "0.0.0.0", "port": hub.port}},  # noqa: S104
        "clusters": {CLUSTER: {"agent": agent}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


class AgentProcess(ServiceAgent):
    """``otterscale agent`` with the tunnel, a debug log, and async waits that fail with its log."""

    def __init__(self, directory: Path, config: Path, cp: ControlPlane, *extra: str) -> None:
        port = free_port()
        super().__init__(
            CLUSTER,
            config,
            cp.kubeconfig,
            directory / f"agent-{port}.log",
            name="agent",
            port=port,
            chisel=tool_path("chisel"),
            args=[arg for arg in extra if not arg.startswith("--tunnel-server-url=")],
            tunnel_server_url=next(
                (arg.split("=", 1)[1] for arg in extra if arg.startswith("--tunnel-server-url=")), None
            ),
        )

    async def wait_for(self, check: Callable[[], bool | Awaitable[bool]], what: str, within: float) -> float:
        """Poll ``check``; return the seconds it took. Fails with the log tail if the agent dies."""
        try:
            return await self.until(check, within, what)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(str(exc))

    async def readyz(self) -> tuple[int, str] | None:
        return await asyncio.to_thread(http_get, self.url + "/readyz")

    async def is_ready(self) -> bool:
        return await self.readyz() == (200, "ok\n")

    async def is_not_ready(self) -> bool:
        answer = await self.readyz()
        return answer is not None and answer[0] == 503

    async def wait_serving(self) -> None:  # type: ignore[override]  # awaited here
        await self.wait_for(lambda: self._status(self.url + "/ping", 204), "answering /ping", 60)

    async def _status(self, url: str, status: int) -> bool:
        answer = await asyncio.to_thread(http_get, url)
        return answer is not None and answer[0] == status


def alive(pid: int) -> bool:
    """Process ``pid`` exists and is not a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


async def through_tunnel(hub: HubTunnel) -> bool:
    """The hub's view: does 127.0.0.1:<tunnel_port>/ping reach the agent?"""
    answer = await asyncio.to_thread(http_get, hub.tunnel_url + "/ping")
    return answer is not None and answer[0] == 204


@pytest_asyncio.fixture
async def start_agent(
    tmp_path: Path, control_plane: ControlPlane
) -> AsyncIterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def factory(config: Path, *extra: str) -> AgentProcess:
        agent = AgentProcess(tmp_path, config, control_plane, *extra)
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        agent.stop()


# --------------------------------------------------------------------------------------------------
# Connected


@pytest.mark.integration
async def test_serves_through_the_tunnel_and_sigterm_stops_chisel(
    tmp_path: Path,
    hub: HubTunnel,
    start_agent: Callable[..., AgentProcess],
    make_client: ClientFactory,
) -> None:
    config = write_config(tmp_path / "otterscale.yaml", hub, fingerprint=hub.fingerprint)
    agent = start_agent(config)  # no --tunnel-server-url: from tunnel.server (0.0.0.0 -> 127.0.0.1)
    await agent.wait_serving()
    await agent.wait_for(agent.is_ready, "ready (/readyz 200)", 15)
    await agent.wait_for(lambda: through_tunnel(hub), "reachable through the tunnel", WITHIN)
    (connected,) = [line for line in agent.log().splitlines() if "tunnel up: connected" in line]
    print(f"\nagent reachable through the tunnel {time.monotonic() - agent.spawned:.2f}s after spawn")
    print(connected.split(": ", 1)[1])

    # A real call, as the hub makes it: through 127.0.0.1:<tunnel_port> on the hub's side.
    for transport in ("grpc-h2c", "connect-h1"):
        rpc = make_client(url=hub.tunnel_url, transport=transport)
        listed = await rpc.list(pb.ListRequest(cluster=CLUSTER, version="v1", resource="namespaces"))
        assert "default" in [item.object["metadata"]["name"] for item in listed.items]
    opened = [e for e in hub.events if e.kind is ServerEventKind.TUNNEL_OPEN]
    assert [(e.user, e.ports) for e in opened] == [(USER, (hub.tunnel_port,))]

    # The chisel client: a child of the agent; the password only in its environment.
    (pid,) = agent.chisel_pids()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert AGENT_PASSWORD.encode() not in b" ".join(argv)
    remote = f"R:127.0.0.1:{hub.tunnel_port}:127.0.0.1:{agent.port}".encode()
    for expected in (b"client", b"--fingerprint", hub.fingerprint.encode(), hub.url.encode(), remote):
        assert expected in argv
    assert argv[argv.index(b"--max-retry-interval") + 1] == b"2s"
    assert argv[argv.index(b"--keepalive") + 1] == b"10s"
    assert Path(f"/proc/{pid}/environ").read_bytes() == f"AUTH={USER}:{AGENT_PASSWORD}\0".encode()

    # SIGTERM to the agent alone (chisel has its own process group): the agent stops chisel.
    os.kill(agent.pid, signal.SIGTERM)
    assert await asyncio.to_thread(agent.popen.wait, 10) == 0
    deadline = time.monotonic() + 2
    while alive(pid):
        assert time.monotonic() < deadline, "chisel client outlived the agent"
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + WITHIN
    while not hub.saw(ServerEventKind.SESSION_CLOSED):
        assert time.monotonic() < deadline, "the hub did not see the session close"
        await asyncio.sleep(0.05)
    assert not await through_tunnel(hub)

    log = agent.log()
    assert "tunnel up: connected to http://127.0.0.1:" in log
    assert "chisel client stopped" in log
    assert "agent stopped" in log
    assert "Traceback" not in log
    assert AGENT_PASSWORD not in log


@pytest.mark.integration
async def test_readyz_follows_the_hub_and_reconnects_within_seconds(
    tmp_path: Path, hub: HubTunnel, start_agent: Callable[..., AgentProcess]
) -> None:
    config = write_config(tmp_path / "otterscale.yaml", hub, fingerprint=hub.fingerprint)
    agent = start_agent(config, f"--tunnel-server-url={hub.url}")
    await agent.wait_serving()
    await agent.wait_for(agent.is_ready, "ready", 15)

    # The hub's tunnel server stops (as on a hub restart): not ready within seconds.
    await hub.stop()
    down = await agent.wait_for(agent.is_not_ready, "unready after the hub stopped", WITHIN)
    status, body = await agent.readyz() or (0, "")
    assert status == 503
    assert body.startswith("tunnel down")
    # Let chisel's backoff reach its cap (repeats are logged at debug), as after a long outage.
    await agent.wait_for(lambda: "attempt 2 failed" in agent.log(), "retrying", 15)
    await hub.start()
    restarted = time.monotonic()
    await agent.wait_for(agent.is_ready, "ready again after the hub restarted", WITHIN)
    ready_after = time.monotonic() - restarted
    await agent.wait_for(lambda: through_tunnel(hub), "reachable again", WITHIN)
    reachable_after = time.monotonic() - restarted
    log = agent.log()
    assert f"tunnel down: disconnected from {hub.url} (" in log
    assert log.count(f"tunnel to {hub.url} not connected: dial tcp") == 1  # once, not per retry
    assert f"tunnel up: reconnected to {hub.url} after" in log
    assert "connected (R:" not in log  # common's own per-line records are left to the agent

    # The hub's chisel server is killed and restarted by its supervisor (a crash).
    assert hub.server is not None
    old = hub.server.pid
    assert old is not None
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    await agent.wait_for(
        lambda: hub.server is not None and hub.server.pid not in (None, old), "hub respawn", 10
    )
    await agent.wait_for(lambda: through_tunnel(hub), "reachable after the hub's chisel crashed", WITHIN)
    crash_after = time.monotonic() - killed
    await agent.wait_for(agent.is_ready, "ready after the crash", WITHIN)

    print(
        f"\nhub tunnel server stopped -> agent /readyz 503 after {down:.2f}s; "
        f"restarted -> /readyz 200 after {ready_after:.2f}s, reachable through the tunnel after "
        f"{reachable_after:.2f}s; hub chisel SIGKILLed -> reachable again after {crash_after:.2f}s "
        "(including the hub's own respawn)"
    )
    assert ready_after < WITHIN
    assert AGENT_PASSWORD not in agent.log()


@pytest.mark.integration
async def test_a_crashed_chisel_client_is_restarted(
    tmp_path: Path, hub: HubTunnel, start_agent: Callable[..., AgentProcess]
) -> None:
    config = write_config(tmp_path / "otterscale.yaml", hub, fingerprint=hub.fingerprint)
    agent = start_agent(config)
    await agent.wait_serving()
    await agent.wait_for(agent.is_ready, "ready", 15)
    (old,) = agent.chisel_pids()
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    await agent.wait_for(lambda: agent.chisel_pids() not in ([], [old]), "chisel restarted", WITHIN)
    await agent.wait_for(lambda: through_tunnel(hub), "reachable again", WITHIN)
    print(f"\nchisel client SIGKILLed -> reachable again after {time.monotonic() - killed:.2f}s")
    await agent.wait_for(agent.is_ready, "ready again", WITHIN)
    assert "(chisel client killed by signal 9)" in agent.log()


@pytest.mark.integration
async def test_sigkill_of_the_agent_leaves_no_chisel(
    tmp_path: Path, hub: HubTunnel, start_agent: Callable[..., AgentProcess]
) -> None:
    config = write_config(tmp_path / "otterscale.yaml", hub, fingerprint=hub.fingerprint)
    agent = start_agent(config)
    await agent.wait_serving()
    await agent.wait_for(lambda: len(agent.chisel_pids()) == 1, "running chisel", 15)
    (pid,) = agent.chisel_pids()
    os.kill(agent.pid, signal.SIGKILL)  # no graceful shutdown: the parent-death signal does it
    deadline = time.monotonic() + 2
    while alive(pid):
        assert time.monotonic() < deadline, "chisel client outlived a SIGKILLed agent"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# Never connected


@pytest.mark.integration
async def test_wrong_fingerprint_never_connects(
    tmp_path: Path, hub: HubTunnel, start_agent: Callable[..., AgentProcess]
) -> None:
    config = write_config(tmp_path / "otterscale.yaml", hub, fingerprint=WRONG_FINGERPRINT)
    agent = start_agent(config)
    await agent.wait_serving()
    await agent.wait_for(lambda: "attempt 3 failed" in agent.log(), "retrying", 20)
    log = agent.log()
    assert "does not match clusters.<name>.agent.fingerprint" in log
    assert f"Invalid fingerprint ({hub.fingerprint})" in log  # what the server presented
    status, body = await agent.readyz() or (0, "")
    assert status == 503
    assert "fingerprint does not match" in body
    assert "tunnel up" not in log
    assert not hub.saw(ServerEventKind.SESSION_OPEN)  # the agent never sent its credentials
    assert not await through_tunnel(hub)


@pytest.mark.integration
async def test_wrong_password_never_connects_and_is_never_shown(
    tmp_path: Path, hub: HubTunnel, start_agent: Callable[..., AgentProcess]
) -> None:
    wrong = "wrong-password-0123456789abcdef-wrong"
    config = write_config(tmp_path / "otterscale.yaml", hub, fingerprint=hub.fingerprint, password=wrong)
    agent = start_agent(config)
    await agent.wait_serving()
    await agent.wait_for(lambda: "attempt 2 failed" in agent.log(), "retrying", 20)
    (pid,) = agent.chisel_pids()
    assert wrong.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    log = agent.log()
    assert "the tunnel server refused the agent's credentials" in log
    assert wrong not in log
    assert AGENT_PASSWORD not in log
    assert hub.saw(ServerEventKind.LOGIN_FAILED)
    assert not hub.saw(ServerEventKind.SESSION_OPEN)
    status, body = await agent.readyz() or (0, "")
    assert status == 503
    assert "refused the agent's credentials" in body
    assert not await through_tunnel(hub)


@pytest.mark.integration
async def test_missing_fingerprint_refuses_to_start(tmp_path: Path, hub: HubTunnel) -> None:
    config = write_config(tmp_path / "otterscale.yaml", hub, fingerprint=None)
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "otterscale.agent",
            f"--cluster={CLUSTER}",
            f"--config={config}",
            f"--chisel={tool_path('chisel')}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"clusters.{CLUSTER}.agent.fingerprint: required" in result.stderr
    assert "start the hub and copy the fingerprint it logs at start-up" in result.stderr
    assert "Traceback" not in result.stderr
    assert not hub.saw(ServerEventKind.SESSION_OPEN)


# --------------------------------------------------------------------------------------------------
# The watchdog ends the agent when chisel cannot be kept running


@pytest.mark.integration
async def test_agent_stops_when_chisel_cannot_be_restarted(
    tmp_path: Path, hub: HubTunnel, start_agent: Callable[..., AgentProcess], chisel: ChiselBinary
) -> None:
    """chisel is killed and its binary is gone: the agent cannot respawn it, and once it has not
    run for the watchdog's time (30 s) the agent exits with status 1, so Kubernetes restarts it
    (and the hook that ends the agent when a root task ends is shown working)."""
    copy = tmp_path / "chisel"
    shutil.copy(chisel.path, copy)
    copy.chmod(copy.stat().st_mode | stat.S_IXUSR)
    config = write_config(tmp_path / "otterscale.yaml", hub, fingerprint=hub.fingerprint)
    agent = start_agent(config, f"--chisel={copy}")
    await agent.wait_serving()
    await agent.wait_for(lambda: through_tunnel(hub), "reachable through the tunnel", 30)
    (client_pid,) = agent.chisel_pids()
    copy.unlink()  # the binary is gone: it cannot be respawned
    os.kill(client_pid, signal.SIGKILL)
    assert await asyncio.to_thread(agent.popen.wait, 90) == 1
    log = agent.log()
    assert "has not been running for 30s" in log
    assert "Traceback" not in log
    assert not agent.chisel_pids()


# --------------------------------------------------------------------------------------------------
# Flags and configuration (no processes but `chisel --version`)


def _config(tmp_path: Path, *, fingerprint: str | None = WRONG_FINGERPRINT, host: str = "0.0.0.0") -> Path:  # noqa: S104
    agent: dict[str, Any] = {
        "auth": {"user": USER, "pass": AGENT_PASSWORD},
        "tunnel_port": 51001,
        "api_port": 8299,
    }
    if fingerprint is not None:
        agent["fingerprint"] = fingerprint
    config = {
        "keycloak": {"realm_url": "https://keycloak.invalid/realms/unused", "client_id": "unused"},
        "tunnel": {"server": {"host": host, "port": 8300}},
        "clusters": {CLUSTER: {"agent": agent}},
    }
    path = tmp_path / "otterscale.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _args(config: Path, *extra: str) -> list[str]:
    return ["--cluster", CLUSTER, "--config", str(config), *extra]


def test_default_server_url() -> None:
    assert default_server_url("0.0.0.0", 8300) == "http://127.0.0.1:8300"  # noqa: S104
    assert default_server_url("", 8300) == "http://127.0.0.1:8300"
    assert default_server_url("::", 8300) == "http://127.0.0.1:8300"
    assert default_server_url("hub.example", 8300) == "http://hub.example:8300"
    assert default_server_url("10.1.2.3", 9000) == "http://10.1.2.3:9000"
    assert default_server_url("fd00::1", 8300) == "http://[fd00::1]:8300"


def test_target_host() -> None:
    assert target_host("") == "127.0.0.1"
    assert target_host("0.0.0.0") == "127.0.0.1"  # noqa: S104
    assert target_host("::") == "127.0.0.1"
    assert target_host("localhost") == "127.0.0.1"
    assert target_host("127.0.0.1") == "127.0.0.1"
    assert target_host("10.0.0.5") == "10.0.0.5"
    assert target_host("::1") == "[::1]"


def test_tunnel_settings_from_flags(tmp_path: Path) -> None:
    chisel = str(tool_path("chisel"))
    settings, _, _ = settings_from_args(_args(_config(tmp_path), "--chisel", chisel), {})
    assert settings.tunnel is not None
    assert settings.tunnel.server_url == "http://127.0.0.1:8300"
    assert settings.tunnel.max_retry_interval == 2.0
    assert AGENT_PASSWORD not in repr(settings)
    url = "https://tunnel.example.com:8443"
    settings, _, _ = settings_from_args(
        _args(_config(tmp_path), "--chisel", chisel, "--tunnel-server-url", url), {}
    )
    assert settings.tunnel is not None
    assert settings.tunnel.server_url == url
    # chisel found on PATH (the environment given, not the test's own).
    settings, _, _ = settings_from_args(_args(_config(tmp_path)), {"PATH": str(Path(chisel).parent)})
    assert settings.tunnel is not None
    assert settings.tunnel.chisel.path == Path(chisel)


def test_no_tunnel(tmp_path: Path) -> None:
    settings, _, _ = settings_from_args(_args(_config(tmp_path, fingerprint=None), "--no-tunnel"), {})
    assert settings.tunnel is None
    with pytest.raises(UsageError, match="drop --tunnel-server-url"):
        settings_from_args(_args(_config(tmp_path), "--no-tunnel", "--tunnel-server-url", "http://h:1"), {})


def test_missing_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, fingerprint=None)
    with pytest.raises(ConfigError, match=r"clusters\.test\.agent\.fingerprint: required") as info:
        settings_from_args(_args(config), {})
    assert "start the hub and copy the fingerprint it logs at start-up" in str(info.value)
    assert main(_args(config)) == 1
    assert "fingerprint: required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "fingerprint", "message"),
    [
        (("--tunnel-server-url", "ftp://hub:21"), WRONG_FINGERPRINT, "must be http"),
        (("--tunnel-server-url", "http://user:secret@hub:8300"), WRONG_FINGERPRINT, "not in the URL"),
        ((), "SHA256:abc", "44 characters"),
    ],
)
def test_bad_tunnel_settings(tmp_path: Path, extra: tuple[str, ...], fingerprint: str, message: str) -> None:
    with pytest.raises(TunnelError, match=message):
        settings_from_args(_args(_config(tmp_path, fingerprint=fingerprint), *extra), {})


def test_chisel_missing_or_too_old(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    with pytest.raises(TunnelError, match="chisel was not found on PATH"):
        settings_from_args(_args(config), {"PATH": str(tmp_path)})
    with pytest.raises(TunnelError, match="does not exist"):
        settings_from_args(_args(config, "--chisel", str(tmp_path / "nope")), {})
    old = tmp_path / "old-chisel"
    old.write_text("#!/bin/sh\necho 1.9.1\n")
    old.chmod(0o755)
    with pytest.raises(TunnelError, match=r"chisel 1\.9\.1, older than the required 1\.11\.5"):
        settings_from_args(_args(config, "--chisel", str(old)), {})
    assert main(_args(config, "--chisel", str(old))) == 1
    assert "older than the required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Readiness and log lines, from chisel's states (the agent's own logic; no processes)


async def test_readiness_and_logs_follow_the_states(caplog: pytest.LogCaptureFixture) -> None:
    tunnel = Tunnel(
        TunnelSettings(
            chisel=ChiselBinary(Path("chisel"), (1, 12, 0)),
            server_url="http://hub:8300",
            fingerprint=WRONG_FINGERPRINT,
            user=USER,
            password=AGENT_PASSWORD,
            tunnel_port=51001,
        )
    )
    assert tunnel.readiness() == "tunnel not started"
    tunnel._client = tunnel.settings.client(api_host="127.0.0.1", api_port=8299)
    tunnel._started_at = time.monotonic()
    caplog.set_level(logging.DEBUG, logger="otterscale.agent._tunnel")
    assert tunnel.readiness() == "tunnel connecting to http://hub:8300"

    refused = "dial tcp: connection refused"
    for attempt in (1, 2, 3):
        tunnel._on_state(ChiselClientState(last_error=refused, attempts=attempt))
    assert tunnel.readiness() == f"tunnel down: {refused}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"tunnel to http://hub:8300 not connected: {refused} (retrying at most 2s apart)"]

    tunnel._on_state(ChiselClientState(connected=True))
    assert tunnel.readiness() is None
    assert "tunnel up: connected to http://hub:8300" in caplog.records[-1].getMessage()

    caplog.clear()
    tunnel._on_state(ChiselClientState(connected=False))  # "Disconnected": the reason follows
    assert tunnel.readiness() == "tunnel down: disconnected from http://hub:8300, reconnecting"
    tunnel._on_state(ChiselClientState(last_error="websocket: close 1006", attempts=1))
    (down,) = caplog.records
    assert down.levelno == logging.INFO
    assert down.getMessage().startswith(
        "tunnel down: disconnected from http://hub:8300 (websocket: close 1006)"
    )

    caplog.clear()
    tunnel._on_state(ChiselClientState(connected=True))
    tunnel._on_state(ChiselClientState(connected=False))  # a clean close: no reason follows
    # The down line waits a moment for a reason that never comes, then is logged without one.
    deadline = time.monotonic() + 10
    while len(caplog.records) < 2:
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        await asyncio.sleep(0.02)
    (up, down) = caplog.records
    assert up.getMessage().startswith("tunnel up: reconnected to http://hub:8300 after")
    assert "(connection closed)" in down.getMessage()
    assert all(AGENT_PASSWORD not in r.getMessage() for r in caplog.records)
