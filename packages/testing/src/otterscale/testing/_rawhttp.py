"""HTTP/1.1 and HTTP/2 (h2c) clients that send exactly what a test asks, for hostile and regression
tests: requests whose body never ends, many streams on one connection, a request next to a Watch.

They say what the server did (status, reset, end of stream, connection closed, and when) and
nothing about how: a test built on them holds for any server. The HTTP/2 side uses the ``h2``
protocol library's client state machine (frames, HPACK, flow control), never a server of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

logger = logging.getLogger(__name__)

Headers = Iterable[tuple[str, str]]
#: An HTTP/2 frame's header: 24-bit length, type, flags, stream id.
FRAME_HEADER = 9


class FrameFeeder:
    """Hands what a server sends to an ``h2`` client connection one frame at a time, and keeps the
    connection open after a graceful GOAWAY (error code 0).

    ``h2`` closes its state machine on any GOAWAY (python-hyper/h2#1181) and then refuses every
    further frame, losing the events of the frames it had already read in the same chunk; but a
    draining server (Envoy) sends GOAWAY with its answer's first frames and lets the streams it
    names finish (RFC 9113, 6.8). A test must not open new streams after it, as clients do not.
    """

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self._conn = conn
        self._pending = b""

    def feed(self, data: bytes) -> list[h2.events.Event]:
        """The events of every whole frame received so far (``h2``'s ProtocolError passes)."""
        pending = self._pending + data
        events: list[h2.events.Event] = []
        start = 0
        while len(pending) - start >= FRAME_HEADER:
            end = start + FRAME_HEADER + int.from_bytes(pending[start : start + 3], "big")
            if len(pending) < end:
                break
            for event in self._conn.receive_data(pending[start:end]):
                events.append(event)
                if isinstance(event, h2.events.ConnectionTerminated) and event.error_code == 0:
                    self._conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            start = end
        self._pending = pending[start:]
        return events


@dataclass
class StreamState:
    """What happened to one HTTP/2 stream (times are ``time.monotonic()``)."""

    stream_id: int
    opened: float
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    #: Count of DATA frames received (empty ones too: a heartbeat is one).
    frames: int = 0
    ended: bool = False
    reset: int | None = None
    closed_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        """The server ended (END_STREAM) or reset the stream."""
        return self.ended or self.reset is not None

    def header(self, name: str) -> str | None:
        """A response header or trailer (lower-case name)."""
        for key, value in (*self.headers, *self.trailers):
            if key == name:
                return value
        return None


class RawH2:
    """One h2c connection (prior knowledge) driven frame by frame. Use ``async with``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.streams: dict[int, StreamState] = {}
        #: Error code of the server's latest GOAWAY (None: none received).
        self.goaway: int | None = None
        self.closed_at: float | None = None
        self.max_concurrent_streams: int | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True, header_encoding="utf-8", validate_outbound_headers=False
            )
        )
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()

    async def __aenter__(self) -> RawH2:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Open the connection, send the preface and wait for the server's SETTINGS."""
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._conn.initiate_connection()
        # A large window, so what the server sends is never held back by this client.
        self._conn.increment_flow_control_window(2**30)
        self._flush()
        self._task = asyncio.create_task(self._read(), name=f"raw-h2:{self.port}")
        async with asyncio.timeout(30):
            await self._settled.wait()

    @property
    def closed(self) -> bool:
        """The server closed the connection."""
        return self.closed_at is not None

    def request(
        self, path: str, headers: Headers = (), *, body: bytes = b"", end: bool = True
    ) -> StreamState:
        """Start a POST to ``path``; send ``body``; end the request only if ``end``."""
        stream_id = self._conn.get_next_available_stream_id()
        pseudo = [(":method", "POST"), (":scheme", "http"), (":authority", f"{self.host}:{self.port}")]
        self._conn.send_headers(stream_id, [*pseudo, (":path", path), *headers], end_stream=end and not body)
        state = self.streams[stream_id] = StreamState(stream_id, time.monotonic())
        if body:
            self._conn.send_data(stream_id, body, end_stream=end)
        self._flush()
        return state

    def send(self, stream: StreamState, data: bytes, *, end: bool = False) -> None:
        """More of a request's body."""
        self._conn.send_data(stream.stream_id, data, end_stream=end)
        self._flush()

    def cancel(self, stream: StreamState) -> None:
        """RST_STREAM (CANCEL) from the client."""
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._conn.reset_stream(stream.stream_id, 8)
            self._flush()

    async def wait(self, stream: StreamState, within: float) -> bool:
        """Wait until the server ended or reset ``stream`` (or closed the connection); True if so."""
        try:
            async with asyncio.timeout(within):
                while not stream.done and not self.closed:
                    stream.changed.clear()
                    await stream.changed.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Close the connection (no GOAWAY: a client that just goes away)."""
        if self._writer is not None:
            # abort, not close: close() waits for unsent bytes, which a server that stopped
            # reading never takes (and a client going away does not wait either).
            self._writer.transport.abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            frames = FrameFeeder(self._conn)
            while True:
                chunk = await self._reader.read(65536)
                if not chunk:
                    break
                try:
                    events = frames.feed(chunk)
                except h2.exceptions.ProtocolError as exc:
                    logger.debug("raw h2: protocol error from the server: %s", exc)
                    break
                for event in events:
                    self._on(event)
                self._flush()
        except (OSError, ConnectionError):
            pass
        finally:
            self.closed_at = time.monotonic()
            self._settled.set()
            for stream in self.streams.values():
                stream.changed.set()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            setting = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
            if setting is not None:
                self.max_concurrent_streams = setting.new_value
            self._settled.set()
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event.error_code
            return
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if stream is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            stream.headers = [(str(k), str(v)) for k, v in event.headers]
            stream.status = int(dict(stream.headers).get(":status", "0"))
        elif isinstance(event, h2.events.TrailersReceived):
            stream.trailers = [(str(k), str(v)) for k, v in event.headers]
        elif isinstance(event, h2.events.DataReceived):
            stream.data += event.data
            stream.frames += 1
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream.ended = True
            stream.closed_at = time.monotonic()
        elif isinstance(event, h2.events.StreamReset):
            stream.reset = int(event.error_code)
            stream.closed_at = time.monotonic()
        stream.changed.set()


# --------------------------------------------------------------------------------------------------
# HTTP/1.1


@dataclass
class RawH1:
    """One HTTP/1.1 connection with a request whose body may never be finished."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened: float
    status: int | None = None
    closed_at: float | None = None

    @classmethod
    async def post(
        cls, host: str, port: int, path: str, headers: Headers = (), *, length: int, body: bytes = b""
    ) -> RawH1:
        """Send a POST's headers declaring ``length`` bytes of body, then ``body`` (may be shorter)."""
        reader, writer = await asyncio.open_connection(host, port)
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {length}"]
        lines += [f"{name}: {value}" for name, value in headers]
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
        except BaseException:  # e.g. reset while sending: the socket must not leak
            writer.transport.abort()
            raise
        return cls(reader, writer, time.monotonic())

    async def wait_closed(self, within: float) -> bool:
        """Read what the server sends until it closes the connection; True if it did in time.

        An answer with ``connection: close`` counts once the connection is closed; the status of
        the first response line is kept.
        """
        try:
            async with asyncio.timeout(within):
                while True:
                    chunk = await self.reader.read(65536)
                    if self.status is None and chunk.startswith(b"HTTP/1.1 "):
                        self.status = int(chunk[9:12])
                    if not chunk:
                        break
        except TimeoutError:
            return False
        except (OSError, ConnectionError):
            pass
        self.closed_at = time.monotonic()
        return True

    async def aclose(self) -> None:
        """Close from the client's side, at once (unsent bytes are dropped: see :meth:`RawH2.aclose`)."""
        self.writer.transport.abort()
