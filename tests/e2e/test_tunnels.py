"""The hub's tunnel server against hostile tunnel clients: a real ``chisel client`` each time.

An agent's credentials open exactly one thing: the reverse port of its own cluster on the hub's
loopback. Not another cluster's port (even when that port is free), not the same port on every
interface, not a forward tunnel into the hub's network, not a reverse SOCKS proxy. (A forward SOCKS
remote with an explicit local port fails in chisel 1.12's client before it reaches the server,
and the default local port 1080 may be taken on a CI machine: the forward cases cover that path.)
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from otterscale.testing import ManagedProcess, System, free_port

from .conftest import Hub

pytestmark = pytest.mark.e2e


def chisel_client_argv(system: System, *remotes: str, retries: int = 0) -> list[str]:
    assert system.fingerprint is not None
    return [
        system.chisel,
        "client",
        "-v",
        "--fingerprint",
        system.fingerprint,
        "--max-retry-count",
        str(retries),
        "--max-retry-interval",
        "1s",
        system.tunnel_url,
        *remotes,
    ]


def run_chisel_client(system: System, user: str, password: str, *remotes: str) -> tuple[int, str]:
    """Run a chisel client to the hub that gives up after the first refusal; its status and output."""
    done = subprocess.run(
        chisel_client_argv(system, *remotes),
        env={"AUTH": f"{user}:{password}", "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_one_clusters_agent_credentials_cannot_open_another_clusters_port(
    hub: Hub, otterscale_system: System, tmp_path: Path
) -> None:
    system = otterscale_system
    east, west = system.clusters["east"], system.clusters["west"]
    # West's agent goes away first, so its port is free: a refusal cannot be "port busy".
    system.stop_agent("west")
    try:
        system.wait_connected("west", False, timeout=10)
        assert not listening(west.tunnel_port)
        target = f"127.0.0.1:{free_port()}"

        status, output = run_chisel_client(
            system, east.user, east.password, f"R:127.0.0.1:{west.tunnel_port}:{target}"
        )
        assert status != 0, output
        assert f"access to 'R:127.0.0.1:{west.tunnel_port}' denied" in output, output
        assert not listening(west.tunnel_port)

        status, output = run_chisel_client(
            system, east.user, "not-the-password", f"R:127.0.0.1:{east.tunnel_port}:{target}"
        )
        assert status != 0, output
        assert "authentication failed" in output.lower() or "unable to authenticate" in output.lower(), output

        clusters = await hub.list_clusters()
        assert not clusters["west"].connected
        assert clusters["east"].connected
        assert "denied" in clusters["west"].last_error or "refused" in clusters["west"].last_error

        # Control: west's own credentials do open west's port (so the refusal above is authz).
        control = ManagedProcess(
            "chisel-control",
            chisel_client_argv(system, f"R:127.0.0.1:{west.tunnel_port}:{target}", retries=3),
            tmp_path / "chisel-control.log",
            env={"AUTH": f"{west.user}:{west.password}", "PATH": "/usr/bin:/bin"},
        )
        try:
            control.wait_until(lambda: listening(west.tunnel_port), timeout=15, what="opening west's port")
        finally:
            control.stop()
        system.wait_connected("west", False, timeout=15)
    finally:
        if "west" not in system.agents:
            system.start_agent("west")


@pytest.mark.parametrize(
    "remote",
    [
        "forward to another cluster's tunnel port",
        "forward to its own tunnel port",
        "forward to the hub's API",
        "reverse socks proxy",
        "its own port on every interface",
        "another cluster's port",
    ],
)
async def test_agent_credentials_open_nothing_else(hub: Hub, otterscale_system: System, remote: str) -> None:
    system = otterscale_system
    east, west = system.clusters["east"], system.clusters["west"]
    local = f"127.0.0.1:{free_port()}"
    spec, denied = {
        "forward to another cluster's tunnel port": (
            f"{local}:127.0.0.1:{west.tunnel_port}",
            f"127.0.0.1:{west.tunnel_port}",
        ),
        "forward to its own tunnel port": (
            f"{local}:127.0.0.1:{east.tunnel_port}",
            f"127.0.0.1:{east.tunnel_port}",
        ),
        "forward to the hub's API": (f"{local}:127.0.0.1:{system.hub_port}", f"127.0.0.1:{system.hub_port}"),
        "reverse socks proxy": (f"R:{local}:socks", f"R:{local}"),
        "its own port on every interface": (
            f"R:0.0.0.0:{east.tunnel_port}:127.0.0.1:1",
            f"R:0.0.0.0:{east.tunnel_port}",
        ),
        "another cluster's port": (
            f"R:127.0.0.1:{west.tunnel_port}:127.0.0.1:1",
            f"R:127.0.0.1:{west.tunnel_port}",
        ),
    }[remote]
    status, output = run_chisel_client(system, east.user, east.password, spec)
    assert status != 0, output
    assert f"access to '{denied}' denied" in output, output
    # The agents' own tunnels were not disturbed.
    clusters = await hub.list_clusters()
    assert clusters["east"].connected
    assert clusters["west"].connected
