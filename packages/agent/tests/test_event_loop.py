"""The agent's event loop: asyncio's, with a small TLS read buffer, and no data lost at a TLS EOF.

The agent runs inside Envoy, on the event loop its launcher names to pyvoy (``_cli.LOOP``); the
slow reader below runs on that same loop, so switching the agent back to uvloop fails here.

The regression this guards against: kube-apiserver ends exec, port-forward and log streams by
closing the TCP connection without a TLS close_notify, and on uvloop (which the agent used to
run on) whatever TLS data was waiting while the agent's reading was paused (a client slower than
the pod) was then discarded: the end of the output never arrived. Here a real TLS server on
loopback sends a known number of bytes and closes its socket the same way while the client reads
slowly; the client, on the loop the agent runs on, must receive every byte.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import importlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otterscale.agent._cli import LOOP, TLS_READ_BUFFER, tune_tls_reads
from otterscale.common._envoy import Address, EnvoyInstall, ListenerLimits, bootstrap
from otterscale.testing._pki import CertificateAuthority

PAYLOAD = 8 * 1024 * 1024


@pytest.fixture
def tuned() -> Iterator[None]:
    saved = asyncio.sslproto.SSLProtocol.max_size
    tune_tls_reads()
    try:
        yield
    finally:
        asyncio.sslproto.SSLProtocol.max_size = saved


def test_the_tls_read_buffer_is_64_kib(tuned: None) -> None:
    assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_BUFFER == 64 * 1024


def test_envoy_runs_the_agent_on_the_loop_it_is_given(tmp_path: Path) -> None:
    install = EnvoyInstall(
        envoy=tmp_path / "envoy", pyvoy_module=tmp_path / "libpyvoy.so", libpython=tmp_path / "libpython.so"
    )
    config = bootstrap(
        name="agent",
        app="otterscale.agent._hosted:app",
        install=install,
        api=Address("127.0.0.1", 0),
        management=None,
        limits=ListenerLimits(),
        admin_socket=tmp_path / "admin.sock",
        routes_file=tmp_path / "routes.json",
        loop=LOOP,
    )
    (listener,) = config["static_resources"]["listeners"]
    (hcm,) = (f for chain in listener["filter_chains"] for f in chain["filters"])
    (pyvoy,) = (f for f in hcm["typed_config"]["http_filters"] if f["name"] == "pyvoy")
    assert LOOP == "asyncio"
    assert json.loads(pyvoy["typed_config"]["filter_config"]["value"])["loop"] == LOOP


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The agent's loop inside Envoy (pyvoy's name for it)."""
    if LOOP == "asyncio":
        return None
    return importlib.import_module(LOOP).new_event_loop  # type: ignore[no-any-return]


def _serve_once(listener: socket.socket, context: ssl.SSLContext) -> None:
    conn, _ = listener.accept()
    with context.wrap_socket(conn, server_side=True) as tls:
        chunk = b"\x5a" * 65536
        for _ in range(PAYLOAD // len(chunk)):
            tls.sendall(chunk)
        # Close the TCP connection without a TLS close_notify, as kube-apiserver's proxy does.
        tls.shutdown(socket.SHUT_RDWR)


def test_no_data_is_lost_when_the_peer_closes_while_reading_is_paused(tmp_path: Path, tuned: None) -> None:
    ca = CertificateAuthority(tmp_path)
    cert, key = ca.issue("server", "localhost", server_names=("127.0.0.1",))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = threading.Thread(target=_serve_once, args=(listener, server_context), daemon=True)
    server.start()

    async def slow_reader() -> int:
        client_context = ssl.create_default_context(cafile=str(ca.cert_file))
        # A small stream buffer pauses the transport after 64 KiB, as a slow client does.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context, limit=65536)
        received = 0
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionResetError, ssl.SSLError):
                    break  # the missing close_notify, reported after everything before it
                if not data:
                    break
                received += len(data)
                if received % (1024 * 1024) < 65536:
                    await asyncio.sleep(0.05)  # the server has long finished sending by now
        finally:
            writer.close()
        return received

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:  # the agent's loop (_cli.LOOP)
        received = runner.run(slow_reader())
    server.join(30)
    listener.close()
    assert received == PAYLOAD
