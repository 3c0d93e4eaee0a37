"""Test doubles of an agent: a test-only ASGI application behind a real chisel tunnel.

A hub under test is a process (:class:`~otterscale.testing.HubProcess`); what it talks to need
not be. :class:`AgentDouble` stands in for an agent when a test needs the agent's side to be
scripted or inspected (which calls arrived, with which headers, over how many connections): it
serves any ASGI application (connectrpc's generated one with a fake implementation, typically)
on loopback, answers the hub prober's ``GET /ping``, and dials the hub's tunnel server with a real
``chisel client``, exactly as the agent does.

The double runs in a thread of its own with its own event loop, so it does not depend on the
test's loop (pytest-asyncio gives each test a new one): one double can serve a whole module, and
a test that blocks its loop (waiting for a process, say) does not stall it. Its coroutines are
awaited from any loop (:meth:`AgentDouble.connect`...). What it records (:attr:`AgentDouble.calls`,
:attr:`AgentDouble.pings`) is appended from its thread and read by the test.

The HTTP server is hypercorn, a dependency of otterscale-testing only: a double is not the
system under test, and needs only HTTP/1.1 and h2c with trailers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from otterscale.common import ChiselBinary, ChiselClient

logger = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]
T = TypeVar("T")

#: Seconds a double's server has to start, and to stop.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Call:
    """One request the double received: its path and the peer (``(host, port)``) it came from.

    Through a tunnel the peer is the chisel client's local connection, one per TCP connection
    the hub opened to the tunnel port: distinct peers are distinct hub connections.
    """

    path: str
    peer: tuple[Any, ...]


class AgentDouble:
    """A test agent of one cluster (see the module docstring): ``await start()`` (or ``serve()``
    from synchronous code), ``await connect(...)``, and ``await stop()`` (or ``shutdown()``).

    ``max_streams`` is the server's HTTP/2 limit of concurrent streams per connection.
    """

    def __init__(
        self,
        cluster: str,
        app: ASGIApp,
        *,
        chisel: ChiselBinary,
        max_streams: int = 1000,
        name: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.name = name or f"agent-double:{cluster}"
        self._app = app
        self._chisel = chisel
        self._max_streams = max_streams
        self.port = 0
        #: ``GET /ping`` requests (the hub's prober).
        self.pings = 0
        #: Every request (``/ping`` too), in order of arrival.
        self.calls: list[Call] = []
        self.tunnel: ChiselClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- the server ---------------------------------------------------------------------------

    async def start(self) -> Self:
        """Serve on a free loopback port; returns once the server runs."""
        return await asyncio.to_thread(self.serve)

    def serve(self) -> Self:
        """:meth:`start`, blocking (for synchronous fixtures)."""
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), name=self.name, daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT) or self._error is not None:
            raise RuntimeError(f"{self.name} did not start") from self._error
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except BaseException as exc:  # reported by start() (or logged when it happens later)
            self._error = exc
            self._started.set()
            logger.exception("%s failed", self.name)

    async def _serve(self, sock: socket.socket) -> None:
        from hypercorn.asyncio.run import worker_serve  # the double's own server (test-only)
        from hypercorn.config import Config, Sockets
        from hypercorn.utils import wrap_app

        self._loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        config = Config()
        config.keep_alive_max_requests = 2**31 - 1  # hypercorn's default closes after 1000
        config.h2_max_concurrent_streams = self._max_streams
        config.graceful_timeout = 1.0
        config.accesslog = None
        try:
            await worker_serve(
                wrap_app(self._asgi, config.wsgi_max_body_size, "asgi"),
                config,
                sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
                shutdown_trigger=self._shutdown.wait,
            )
        finally:
            if self.tunnel is not None:
                await self.tunnel.stop()
                self.tunnel = None
            sock.close()

    async def _asgi(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                    self._started.set()
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.calls.append(Call(scope["path"], tuple(scope.get("client") or ())))
        if scope["path"] == "/ping":
            self.pings += 1
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self._app(scope, receive, send)

    # --- running coroutines on the double's loop --------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the double's loop (from any thread)."""
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(self.submit(coro))

    # --- the tunnel -----------------------------------------------------------------------------

    async def connect(
        self,
        server_url: str,
        fingerprint: str,
        *,
        user: str,
        password: str,
        tunnel_port: int,
        wait: bool = True,
        within: float = 30.0,
    ) -> None:
        """Dial the hub's tunnel server (a real chisel client); with ``wait``, until it is up."""
        await self._call(self._dial(server_url, fingerprint, user, password, tunnel_port, wait, within))

    def dial(
        self,
        server_url: str,
        fingerprint: str,
        *,
        user: str,
        password: str,
        tunnel_port: int,
        within: float = 30.0,
    ) -> None:
        """:meth:`connect` (and wait), blocking (for synchronous fixtures)."""
        future = self.submit(self._dial(server_url, fingerprint, user, password, tunnel_port, True, within))
        future.result(within + STOP_TIMEOUT)

    async def _dial(
        self,
        server_url: str,
        fingerprint: str,
        user: str,
        password: str,
        tunnel_port: int,
        wait: bool,
        within: float,
    ) -> None:
        if self.tunnel is not None:
            await self.tunnel.stop()
        self.tunnel = ChiselClient(
            self._chisel,
            server_url=server_url,
            fingerprint=fingerprint,
            user=user,
            password=password,
            tunnel_port=tunnel_port,
            api_port=self.port,
            max_retry_interval=1.0,
        )
        await self.tunnel.start()
        if wait and not await self.tunnel.wait_connected(within):
            raise RuntimeError(f"{self.name}'s tunnel did not connect: {self.tunnel.state}")

    @property
    def connected(self) -> bool:
        """The chisel client reports the tunnel up."""
        return self.tunnel is not None and self.tunnel.connected

    async def wait_connected(self, within: float) -> bool:
        """Wait until the tunnel is up (the chisel client reconnects on its own); False on timeout."""

        async def wait() -> bool:
            return self.tunnel is not None and await self.tunnel.wait_connected(within)

        return await self._call(wait())

    async def disconnect(self) -> None:
        """Stop the chisel client (the hub sees the tunnel close)."""

        async def stop() -> None:
            if self.tunnel is not None:
                await self.tunnel.stop()
                self.tunnel = None

        if self._loop is not None:
            await self._call(stop())

    # --- the end --------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Close the tunnel and the server, and end the thread (idempotent)."""
        await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        """:meth:`stop`, blocking (for synchronous fixtures)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, shutdown = self._loop, self._shutdown
        if loop is not None and shutdown is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(shutdown.set)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop within {STOP_TIMEOUT:g}s")
        self._loop = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
