"""The hub's tunnel server against hostile tunnel clients: a real ``chisel client`` each time.

An agent's credentials open exactly one thing: the reverse port of its own cluster on the hub's
loopback. Not another cluster's port (even when that port is free), not the same port on every
interface, not a forward tunnel into the hub's network, not a reverse SOCKS proxy. (A forward SOCKS
remote with an explicit local port fails in chisel 1.12's client before it reaches the server,
and the default local port 1080 may be taken on a CI machine: the forward cases cover that path.)

And whoever reaches an agent's API port without the tunnel (here: on this host's loopback) gets
nothing without a fresh signature the hub made for that very cluster: not unsigned, not with a
bearer token, not with a signature older than the window, not with one made for another cluster
(with that cluster's key, or with this cluster's key over the other cluster's name). Even a client
that knows an agent's password cannot push signed identity headers through the hub.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import Identity, derive_identity_key, sign_identity
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ManagedProcess, System, free_port

from .conftest import Hub

pytestmark = [pytest.mark.e2e, pytest.mark.security]

LIST = "/otterscale.resource.v1.ResourceService/List"


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
        "forward to an agent's API port",
        "forward to a kube-apiserver",
        "forward to a public address",
    ],
)
async def test_agent_credentials_open_nothing_else(hub: Hub, otterscale_system: System, remote: str) -> None:
    system = otterscale_system
    east, west = system.clusters["east"], system.clusters["west"]
    local = f"127.0.0.1:{free_port()}"
    assert west.control_plane is not None
    kube_address = f"127.0.0.1:{west.control_plane.port}"
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
        "forward to an agent's API port": (
            f"{local}:127.0.0.1:{west.api_port}",
            f"127.0.0.1:{west.api_port}",
        ),
        "forward to a kube-apiserver": (f"{local}:{kube_address}", kube_address),
        "forward to a public address": (f"{local}:192.0.2.1:443", "192.0.2.1:443"),
    }[remote]
    status, output = run_chisel_client(system, east.user, east.password, spec)
    assert status != 0, output
    assert f"access to '{denied}' denied" in output, output
    # The agents' own tunnels were not disturbed.
    clusters = await hub.list_clusters()
    assert clusters["east"].connected
    assert clusters["west"].connected


def test_a_client_without_agent_credentials_opens_nothing(otterscale_system: System) -> None:
    system = otterscale_system
    west = system.clusters["west"]
    target = f"127.0.0.1:{free_port()}:127.0.0.1:{system.hub_port}"
    east = system.clusters["east"]
    for user, password in (("nobody", "nothing"), (west.user, "wrong"), (west.user, east.password)):
        status, output = run_chisel_client(system, user, password, target)
        assert status != 0, output
        assert "authentication failed" in output.lower() or "unable to authenticate" in output.lower(), output


# --------------------------------------------------------------------------------------------------
# Straight to an agent's API port, around the hub


@pytest_asyncio.fixture
async def agent_clients(otterscale_system: System) -> AsyncIterator[dict[str, ResourceServiceClient]]:
    """Connect clients of each agent's API port (which the local provider binds on loopback)."""
    transports = []
    clients = {}
    for name in ("east", "west"):
        http = HTTPTransport(http_version=HTTPVersion.HTTP1)
        transports.append(http)
        clients[name] = ResourceServiceClient(
            f"http://127.0.0.1:{otterscale_system.clusters[name].api_port}",
            protocol=ProtocolType.CONNECT,
            http_client=Client(http),
            timeout_ms=10_000,
        )
    try:
        yield clients
    finally:
        for client in clients.values():
            await client.close()
        for http in transports:
            await http.aclose()


def _signed(
    system: System, identity: Identity, *, key_of: str, cluster: str, method: str = LIST, age: float = 0
) -> dict[str, str]:
    """Identity headers as the hub makes them, with the key of cluster ``key_of`` over ``cluster``."""
    key = derive_identity_key(key_of, system.clusters[key_of].password)
    return sign_identity(identity, cluster=cluster, method=method, key=key, now=time.time() - age)


def _list(cluster: str, namespace: str) -> pb.ListRequest:
    return pb.ListRequest(cluster=cluster, version="v1", resource="configmaps", namespace=namespace)


async def test_an_agents_port_answers_only_the_hubs_fresh_signature_for_its_cluster(
    hub: Hub, otterscale_system: System, agent_clients: dict[str, ResourceServiceClient], namespace: str
) -> None:
    system = otterscale_system
    west = agent_clients["west"]
    bob = Identity(hub.subject("bob"))  # bob may edit in west (the rbac fixture)
    # Control: what the hub sends (a fresh signature made with west's key for west) works, so
    # every refusal below is the signature's doing, not a wrong port or RBAC.
    listed = await west.list(
        _list("west", namespace), headers=_signed(system, bob, key_of="west", cluster="west")
    )
    assert listed.resource_version

    attempts = {
        "unsigned": {},
        "a user's bearer token": hub.auth("bob"),
        "only the subject header (the original protocol)": {"X-Otterscale-Subject": bob.subject},
        "replayed after the window": _signed(system, bob, key_of="west", cluster="west", age=31),
        "replayed long after": _signed(system, bob, key_of="west", cluster="west", age=3600),
        "from the future": _signed(system, bob, key_of="west", cluster="west", age=-120),
        "east's signature (east's key, cluster east)": _signed(system, bob, key_of="east", cluster="east"),
        "east's key over west's name": _signed(system, bob, key_of="east", cluster="west"),
        "west's key over east's name": _signed(system, bob, key_of="west", cluster="east"),
        "another RPC's signature": _signed(
            system, bob, key_of="west", cluster="west", method="/otterscale.resource.v1.ResourceService/Get"
        ),
    }
    for what, headers in attempts.items():
        with pytest.raises(ConnectError) as caught:
            await west.list(_list("west", namespace), headers=headers)
        assert caught.value.code is Code.UNAUTHENTICATED, what
        assert "identity" in caught.value.message or "X-Otterscale" in caught.value.message, what
        for value in headers.values():  # neither the signature nor the token comes back
            assert len(value) < 20 or value not in caught.value.message, what

    # A signature for west presented to east's agent is refused the same way.
    with pytest.raises(ConnectError) as caught:
        await agent_clients["east"].list(
            _list("east", namespace), headers=_signed(system, bob, key_of="west", cluster="west")
        )
    assert caught.value.code is Code.UNAUTHENTICATED
    # And a valid west signature cannot address another cluster through west's agent.
    with pytest.raises(ConnectError) as other:
        await west.list(_list("east", namespace), headers=_signed(system, bob, key_of="west", cluster="west"))
    assert other.value.code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED)


async def test_client_sent_signed_identity_and_impersonation_headers_do_not_pass(
    hub: Hub, otterscale_system: System, agent_clients: dict[str, ResourceServiceClient], namespace: str
) -> None:
    """Even headers signed with the right key (a client that knows west's agent password) are
    dropped by the hub; and the agent ignores Impersonate-* next to a valid hub signature."""
    system = otterscale_system
    bob = Identity(hub.subject("bob"))
    alice = Identity(hub.subject("alice"))
    smuggled = {
        **_signed(system, bob, key_of="west", cluster="west"),
        "Impersonate-User": bob.subject,
        "Impersonate-Group": "system:masters",
    }
    with pytest.raises(ConnectError) as caught:
        await hub.client().list(_list("west", namespace), headers=hub.auth("alice", **smuggled))
    assert caught.value.code is Code.PERMISSION_DENIED  # ran as alice, who may not list in west
    assert alice.subject in caught.value.message
    assert bob.subject not in caught.value.message

    # Straight to the agent: a valid signature for alice plus impersonation headers naming bob
    # (and system:masters) still runs as alice.
    headers = {
        **_signed(system, alice, key_of="west", cluster="west"),
        "Impersonate-User": bob.subject,
        "Impersonate-Group": "system:masters",
        "Impersonate-Uid": bob.subject,
    }
    with pytest.raises(ConnectError) as direct:
        await agent_clients["west"].list(_list("west", namespace), headers=headers)
    assert direct.value.code is Code.PERMISSION_DENIED
    assert alice.subject in direct.value.message
    assert bob.subject not in direct.value.message
