"""A TCP relay that can black-hole its connections: a network partition without root.

:class:`BlackHoleRelay` listens on loopback and copies bytes both ways between each accepted
connection and a fixed target (for the fault tests: between an agent's chisel client and the
hub's chisel server; point the agent's ``--tunnel-server-url`` at :attr:`BlackHoleRelay.url`).
:meth:`BlackHoleRelay.freeze` stops copying on every connection open at that moment, in both
directions, and keeps their sockets open: neither end sees a FIN or an RST, exactly as when a
link silently drops every packet, so only the ends' own keepalives can notice. Connections
accepted after the freeze pass normally, so a peer that gives up on the dead link and dials again
gets through. :meth:`BlackHoleRelay.thaw` lets the frozen ones flow again (bytes held back are
delivered in order; nothing is dropped, so a stream that survived stays intact).

Why a relay and not the real thing: dropping packets with a network namespace, ``tc netem`` or
``iptables`` needs root (or CAP_NET_ADMIN) and a Linux host; a user-space relay works everywhere
the tests run. The difference: a frozen relay stops *reading*, so the sender's kernel buffers fill
and its TCP window closes (no retransmission timeouts) instead of packets vanishing; to
application-level keepalives (chisel's SSH pings), the two look the same: no answer.

``latency`` (seconds) makes it a slow link instead: every chunk is delivered that long after it
arrived, in order, in both directions (pipelined, so throughput is not cut, only delay added),
for the "slow cluster" tests.

Plain threads, not asyncio: the relay outlives any one event loop and must keep copying while a
test blocks its loop (starting a process, say). Never logs the bytes it copies.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

#: How often a copying thread looks up from a quiet socket to check for freeze and close.
_POLL_SECONDS = 0.05
_CHUNK = 64 * 1024


class _Link:
    """One relayed connection: the accepted socket, the one to the target, two copying threads."""

    def __init__(
        self,
        number: int,
        downstream: socket.socket,
        upstream: socket.socket,
        latency: float = 0.0,
        *,
        frozen: bool = False,
    ) -> None:
        self.number = number
        self.downstream = downstream
        self.upstream = upstream
        self.latency = latency
        #: Set while bytes may flow; cleared by a freeze.
        self.flowing = threading.Event()
        if not frozen:
            self.flowing.set()
        self.closed = threading.Event()
        self._open_directions = 2
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(
                target=self._copy, args=(downstream, upstream), name=f"relay-{number}-up", daemon=True
            ),
            threading.Thread(
                target=self._copy, args=(upstream, downstream), name=f"relay-{number}-down", daemon=True
            ),
        ]
        for thread in self.threads:
            thread.start()

    def _copy(self, source: socket.socket, target: socket.socket) -> None:
        if self.latency <= 0:
            self._copy_now(source, target)
            return
        # A slow link: a writer thread sends each chunk `latency` after it was read.
        pending: queue.Queue[tuple[float, bytes]] = queue.Queue()
        writer = threading.Thread(
            target=self._deliver, args=(pending, target), name=f"relay-{self.number}-late", daemon=True
        )
        writer.start()
        self._copy_now(source, _Delayed(pending, self.latency))  # type: ignore[arg-type]
        pending.put((0.0, b""))  # the reader stopped, for whatever reason: so does the writer
        writer.join(timeout=self.latency + 5)

    def _deliver(self, pending: queue.Queue[tuple[float, bytes]], target: socket.socket) -> None:
        try:
            while True:
                due, data = pending.get()
                if not data:
                    with contextlib.suppress(OSError):
                        target.shutdown(socket.SHUT_WR)
                    return
                wait = due - time.monotonic()
                if wait > 0 and self.closed.wait(wait):
                    return
                target.sendall(data)
        except (OSError, ValueError):
            pass

    def _copy_now(self, source: socket.socket, target: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(source, selectors.EVENT_READ)
            try:
                while not self.closed.is_set():
                    # Frozen: do not read at all (the bytes wait in the kernel, nothing is lost).
                    if not self.flowing.wait(_POLL_SECONDS):
                        continue
                    if not selector.select(_POLL_SECONDS):
                        continue
                    if not self.flowing.is_set():
                        continue
                    data = source.recv(_CHUNK)
                    if not data:
                        with contextlib.suppress(OSError):
                            target.shutdown(socket.SHUT_WR)
                        break
                    target.sendall(data)
            except (OSError, ValueError):
                pass  # either end went away (reset, or closed by close()): the link is over
        with self._lock:
            self._open_directions -= 1
            done = self._open_directions == 0
        if done:
            self.close()

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()  # wake a frozen thread so it sees the close
        for sock in (self.downstream, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()


class _Delayed:
    """Stands in for the target socket of a slow link: queues what would be sent, with its due time."""

    def __init__(self, pending: queue.Queue[tuple[float, bytes]], latency: float) -> None:
        self._pending = pending
        self._latency = latency

    def sendall(self, data: bytes) -> None:
        self._pending.put((time.monotonic() + self._latency, bytes(data)))

    def shutdown(self, how: int) -> None:
        self._pending.put((time.monotonic() + self._latency, b""))


class BlackHoleRelay:
    """A loopback TCP relay to ``target`` whose connections can be frozen (module docstring).

    Use as a context manager, or call :meth:`start` and :meth:`close`::

        with BlackHoleRelay(("127.0.0.1", system.tunnel_port)) as relay:
            system.start_agent("east", tunnel_server_url=relay.url)
            relay.freeze()  # the agent's tunnel is now a black hole

    """

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1", latency: float = 0.0) -> None:
        self.target = target
        self.host = host
        #: Seconds every chunk is held back, both ways (0: deliver at once).
        self.latency = latency
        self.port = 0
        #: Connections accepted so far (a reconnect after a freeze makes this grow).
        self.accepted = 0
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._closing = threading.Event()
        #: New connections start frozen (``freeze(later=True)``, until :meth:`thaw`).
        self._freeze_later = False

    @property
    def url(self) -> str:
        """``http://host:port`` of the relay (what a chisel client is told to dial)."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        """Listen on a free port and start accepting; returns self."""
        listener = socket.create_server((self.host, 0))
        listener.settimeout(_POLL_SECONDS * 4)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True)
        self._acceptor.start()
        logger.debug("relay %s -> %s:%d started", self.url, *self.target)
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError as exc:
                logger.debug("relay %s: the target refused a connection: %s", self.url, exc)
                downstream.close()
                continue
            for sock in (downstream, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.accepted += 1
                self._links = [link for link in self._links if not link.closed.is_set()]
                self._links.append(
                    _Link(self.accepted, downstream, upstream, self.latency, frozen=self._freeze_later)
                )

    @property
    def open_connections(self) -> int:
        """Connections currently relayed (frozen or not)."""
        with self._lock:
            return sum(not link.closed.is_set() for link in self._links)

    @property
    def frozen_connections(self) -> int:
        """Open connections that are frozen."""
        with self._lock:
            return sum(not link.closed.is_set() and not link.flowing.is_set() for link in self._links)

    def freeze(self, *, later: bool = False) -> int:
        """Stop copying on every connection open now (both ways; sockets stay open).

        Later connections are not affected, unless ``later``: then they are accepted and frozen
        too (a server that stops answering, not one whose old connections broke). Returns how
        many open connections were frozen.
        """
        with self._lock:
            self._freeze_later = later
            links = [link for link in self._links if not link.closed.is_set()]
            for link in links:
                link.flowing.clear()
        logger.debug("relay %s: froze %d connections", self.url, len(links))
        return len(links)

    def thaw(self) -> None:
        """Let every frozen connection flow again (held-back bytes are delivered in order)."""
        with self._lock:
            self._freeze_later = False
            for link in self._links:
                link.flowing.set()

    def close(self) -> None:
        """Stop accepting and close every connection (both sides see the close). Idempotent."""
        self._closing.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        for link in links:
            for thread in link.threads:
                thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BlackHoleRelay({self.url} -> {self.target[0]}:{self.target[1]})"
