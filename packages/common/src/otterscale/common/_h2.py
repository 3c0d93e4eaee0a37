"""hypercorn 0.18, made fit for hundreds of Watch streams and for clients that stop reading or leave.

The hub and the agent both serve through hypercorn; :func:`tune_hypercorn` (called by
:func:`otterscale.common.serve`) changes six things in it, process-wide, because hypercorn's
configuration has no hook for any of them:

1. **An O(1) send scheduler.** hypercorn picks the next stream to send from with
   ``priority.PriorityTree``, whose ``Stream.schedule`` pops every *blocked* stream off a heap and
   pushes it back for each frame it sends, so every DATA frame costs O(open streams). With
   hundreds of Watch streams on one connection (each blocked until its next event) that was ~70 %
   of the hub's and the agent's Watch CPU (bench ``--only watch``, py-spy
   ``priority.Stream.schedule``); with :class:`RoundRobinScheduler` the hub's Watch CPU fell from
   35 % to 6-8 % of a core, the agent's from 27 % to 5-7 %. It keeps only the streams that have
   data to send, in an insertion-ordered dict, and hands them out in turn. It ignores HTTP/2
   priority signals (stream dependencies and weights), which RFC 9113 section 5.3 deprecates and
   lets a server ignore. Everything else hypercorn relies on is kept: the same exceptions
   (``DeadlockError`` when nothing can be sent, ``MissingStreamError``, ``DuplicateStreamError``,
   ``TooManyStreamsError``, ``PseudoStreamError``, ``PriorityLoop``) at the same points.
2. **Cached Huffman decoding.** hpack decodes Huffman-coded header values in pure Python, bit by
   bit, and clients send some long values again on every request without indexing them (hyper
   marks ``authorization`` never-indexed, so a ~1 KiB bearer token is decoded per request: 5-8 %
   of the hub's CPU per Get). A small LRU cache (:data:`HUFFMAN_CACHE` entries of at most
   :data:`HUFFMAN_CACHE_MAX_BYTES`) sits in front of hpack's ``decode_huffman``, a pure function,
   so the answers (and errors, which are not cached) are unchanged. It holds recently seen header
   values in process memory, as hpack's own dynamic table does.
3. **Backpressure.** A stream's send buffer is meant to block the application above 32 KiB until
   it drains below 16 KiB, but hypercorn releases the writer whenever it *sends* less than 16 KiB,
   including the zero bytes it sends into a closed flow-control window, so every event of a Watch
   whose client grants no window piled up in memory (85 MiB in 13 s in the hub's test). The fix
   releases the writer only when the *buffer* is below 16 KiB, so the application's send blocks
   (and the hub's Watch send timeout applies).
4. **Reset of unfinished streams, release of closed connections.** When an application returns
   without finishing its response
   (the hub ends a Watch whose client stopped reading), hypercorn forgets the stream but neither
   ends nor resets it: the client would wait forever and the buffered bytes stay until the
   connection closes. The fix resets the stream (RST_STREAM CANCEL) and drops its buffer. And
   when the peer closes the connection, the buffers of its streams are closed too: otherwise an
   application blocked on a full buffer waits forever and the socket stays in CLOSE_WAIT.

5. **Closing a connection whose peer reads nothing.** hypercorn closes a connection (after an
   HTTP/1.1 response the application abandoned, on the keep-alive timeout, at shutdown) with
   asyncio's ``close()``, which keeps the socket open until its write buffer has gone out, and
   then waits for that without a bound: a client that stopped reading (the hub ends its Watch
   after the send timeout) kept a socket, a task and the buffered bytes forever. The close now
   waits at most :data:`CLOSE_TIMEOUT` seconds and then resets the connection. And a connection
   whose peer has gone is closed at once: hypercorn kept it open until its keep-alive timer ran
   out (120 s here), so every connection cut while idle (a hub or a tunnel restarting) sat in
   CLOSE_WAIT that long (a 30-minute soak with long-lived agents ended with ~20 in each agent).

6. **Request data after the answer.** A server may answer before the request body has ended (an
   error on a client or bidirectional stream's first message, an agent whose stream ended while
   the hub still sends): hypercorn then forgets the stream, and the client's next DATA frame for
   it raises ``KeyError`` out of the connection's event loop, which drops the whole connection
   with every other call on it (the client saw ``unavailable: broken pipe`` instead of the
   answer). Such frames are now acknowledged (so the connection's flow-control window does not
   shrink) and dropped, as RFC 9113 section 8.1 lets a server that has answered ignore the rest
   of the request.

Each change checks the hypercorn version it was written against (the dependency is pinned) and
leaves hypercorn alone, with a warning, for any other version. :func:`tune_hypercorn` is
idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from importlib import metadata
from typing import Any

from priority.priority import (  # hypercorn's dependency; the names hypercorn catches
    DeadlockError,
    DuplicateStreamError,
    MissingStreamError,
    PriorityLoop,
    PseudoStreamError,
    TooManyStreamsError,
)

logger = logging.getLogger(__name__)

__all__ = ["RoundRobinScheduler", "cached_huffman_decoder", "tune_hypercorn"]

#: hypercorn versions whose H2Protocol uses ``self.priority`` exactly as this module assumes.
SUPPORTED_HYPERCORN = ("0.18.",)
#: Decoded Huffman strings kept (recent distinct long header values, e.g. bearer tokens).
HUFFMAN_CACHE = 256
#: Longer encoded values are decoded every time (bounds the cache at about 2 MiB).
HUFFMAN_CACHE_MAX_BYTES = 8192
#: Shorter encoded values are cheaper to decode than to look up.
HUFFMAN_CACHE_MIN_BYTES = 24
#: Same default as ``priority.PriorityTree`` (which counts its root pseudo-stream 0 too).
MAXIMUM_STREAMS = 1000


class RoundRobinScheduler:
    """Drop-in for ``priority.PriorityTree`` as hypercorn's ``H2Protocol`` uses it, O(1) per call."""

    __slots__ = ("_active", "_maximum", "_streams")

    def __init__(self, maximum_streams: int = MAXIMUM_STREAMS) -> None:
        if maximum_streams <= 0:
            raise ValueError("maximum_streams must be a positive integer.")
        self._maximum = maximum_streams
        self._streams: set[int] = set()
        # Streams with data to send, in the order they get their next turn (dict = ordered set).
        self._active: dict[int, None] = {}

    def insert_stream(
        self, stream_id: int, depends_on: int | None = None, weight: int = 16, exclusive: bool = False
    ) -> None:
        """Add a stream (active, as in PriorityTree); dependency and weight are ignored."""
        if stream_id == 0 or stream_id in self._streams:  # 0: PriorityTree's root
            raise DuplicateStreamError(f"Stream {stream_id} already in tree")
        if len(self._streams) + 2 > self._maximum:  # + the root pseudo-stream PriorityTree counts
            raise TooManyStreamsError(
                f"Refusing to insert {self._maximum + 1} streams into priority tree at once"
            )
        if depends_on == stream_id:
            raise PriorityLoop(f"Stream {stream_id} must not depend on itself.")
        self._streams.add(stream_id)
        self._active[stream_id] = None

    def reprioritize(
        self, stream_id: int, depends_on: int | None = None, weight: int = 16, exclusive: bool = False
    ) -> None:
        """Accept a PRIORITY signal for a known stream (and otherwise ignore it)."""
        if stream_id == 0:
            raise PseudoStreamError("Cannot reprioritize stream 0")
        if stream_id not in self._streams:
            raise MissingStreamError(f"Stream {stream_id} not in tree")
        if depends_on == stream_id:
            raise PriorityLoop(f"Stream {stream_id} must not depend on itself")

    def remove_stream(self, stream_id: int) -> None:
        if stream_id == 0:
            raise PseudoStreamError("Cannot remove stream 0")
        try:
            self._streams.remove(stream_id)
        except KeyError:
            raise MissingStreamError(f"Stream {stream_id} not in tree") from None
        self._active.pop(stream_id, None)

    def block(self, stream_id: int) -> None:
        """The stream has nothing to send (or no flow-control window): skip it."""
        if stream_id == 0:
            raise PseudoStreamError("Cannot block stream 0")
        if stream_id not in self._streams:
            raise MissingStreamError(f"Stream {stream_id} not in tree")
        self._active.pop(stream_id, None)

    def unblock(self, stream_id: int) -> None:
        """The stream has data to send: give it a turn (keeps its place if already waiting)."""
        if stream_id == 0:
            raise PseudoStreamError("Cannot unblock stream 0")
        if stream_id not in self._streams:
            raise MissingStreamError(f"Stream {stream_id} not in tree")
        self._active[stream_id] = None

    def __iter__(self) -> RoundRobinScheduler:
        return self

    def __next__(self) -> int:
        """The next stream to send a frame from; it moves to the back of the queue."""
        active = self._active
        if not active:
            raise DeadlockError("No unblocked streams to schedule.")
        stream_id = next(iter(active))
        del active[stream_id]
        active[stream_id] = None
        return stream_id


def cached_huffman_decoder(decode: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """``decode`` (hpack's ``decode_huffman``) behind a bounded LRU cache for long values."""
    cached = functools.lru_cache(maxsize=HUFFMAN_CACHE)(decode)

    @functools.wraps(decode)
    def decode_huffman(huffman_string: Any) -> bytes:
        if huffman_string is None or not (
            HUFFMAN_CACHE_MIN_BYTES <= len(huffman_string) <= HUFFMAN_CACHE_MAX_BYTES
        ):
            return decode(huffman_string)
        return cached(bytes(huffman_string))  # bytes: memoryview/bytearray are not hashable

    decode_huffman._otterscale_cached = True  # type: ignore[attr-defined]
    return decode_huffman


def _supported(otherwise: str) -> bool:
    """Whether the installed hypercorn is one the changes were written for; if not, log what
    stays as it is (``otherwise``)."""
    version = metadata.version("hypercorn")
    if version.startswith(SUPPORTED_HYPERCORN):
        return True
    logger.warning(
        "hypercorn %s: %s (the change is written for %s)",
        version,
        otherwise,
        ", ".join(v + "x" for v in SUPPORTED_HYPERCORN),
    )
    return False


def _install_scheduler_and_cache() -> bool:
    """Make every hypercorn HTTP/2 connection opened from now on use :class:`RoundRobinScheduler`,
    and hpack's Huffman decoding cached (items 1 and 2 of the module docstring).

    Returns whether it is (now) installed; False, with a warning, for an unexpected hypercorn.
    """
    from hpack import hpack as hpack_module
    from hypercorn.protocol.h2 import H2Protocol

    decode = hpack_module.decode_huffman  # type: ignore[attr-defined]  # imported there, not exported
    if not getattr(decode, "_otterscale_cached", False):
        hpack_module.decode_huffman = cached_huffman_decoder(decode)  # type: ignore[attr-defined,assignment]

    if getattr(H2Protocol.__init__, "_otterscale_round_robin", False):
        return True
    if not _supported("keeping its own HTTP/2 stream scheduler (O(streams) per frame)"):
        return False
    original = H2Protocol.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.priority = RoundRobinScheduler()

    __init__._otterscale_round_robin = True  # type: ignore[attr-defined]
    H2Protocol.__init__ = __init__
    return True


def _install_flow_fixes() -> bool:
    """Bound send buffers and reset unfinished streams (items 3 and 4 of the module docstring).

    Replaces ``StreamBuffer.pop`` and wraps ``H2Protocol.stream_send``. Returns whether the fixes
    are in place; False, with a warning, for an unexpected hypercorn.
    """
    from hypercorn.events import Closed
    from hypercorn.protocol.events import StreamClosed
    from hypercorn.protocol.h2 import BUFFER_LOW_WATER, H2Protocol, StreamBuffer

    original = H2Protocol.stream_send
    if getattr(original, "_otterscale_stream_reset", False):
        return True
    if not _supported("HTTP/2 send buffers of clients that stop reading are not bounded"):
        return False

    async def pop(self: Any, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < BUFFER_LOW_WATER:  # hypercorn 0.18 tests len(data) here
            await self._paused.set()
        if len(self.buffer) == 0:
            await self._is_empty.set()
        return data

    StreamBuffer.pop = pop

    @functools.wraps(original)
    async def stream_send(self: Any, event: Any) -> None:
        if isinstance(event, StreamClosed):
            await _reset_unfinished(self, event.stream_id)
        await original(self, event)

    stream_send._otterscale_stream_reset = True  # type: ignore[attr-defined]
    H2Protocol.stream_send = stream_send

    original_handle = H2Protocol.handle

    @functools.wraps(original_handle)
    async def handle(self: Any, event: Any) -> None:
        await original_handle(self, event)
        if isinstance(event, Closed):
            # The connection is gone, so nobody pops its send buffers any more: an application
            # blocked in a full buffer's push (a Watch whose peer stopped reading, then left)
            # would wait forever, and the socket would stay in CLOSE_WAIT (the 30-minute soak
            # found 34 such sockets in one agent). Closing the buffers releases it.
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    H2Protocol.handle = handle
    return True


#: Seconds a closing connection may take to hand its last bytes to the peer before it is reset.
CLOSE_TIMEOUT = 5.0


def _install_bounded_close() -> bool:
    """Close a connection whose peer reads nothing within :data:`CLOSE_TIMEOUT`, and one whose
    peer has gone at once (item 5).

    Replaces ``TCPServer._close`` and wraps ``_read_data`` and ``protocol_send`` of hypercorn's
    asyncio worker, for HTTP/1.1 and HTTP/2 alike.
    """
    from hypercorn.asyncio.tcp_server import TCPServer
    from hypercorn.events import Updated

    original = TCPServer._close
    if getattr(original, "_otterscale_bounded", False):
        return True
    if not _supported("connections of clients that stop reading or leave are not released"):
        return False

    async def _close(self: Any) -> None:
        with contextlib.suppress(NotImplementedError, OSError, RuntimeError):  # TLS has no EOF
            self.writer.write_eof()
        try:
            self.writer.close()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self.writer.wait_closed()
            except TimeoutError:
                # asyncio closes the socket only once its write buffer is empty, and the peer
                # takes nothing: drop the rest (at most the 64 KiB over which hypercorn's writes
                # wait) and reset the connection, or the socket and this task stay forever.
                logger.debug("reset a connection whose peer took no data for %.0fs", CLOSE_TIMEOUT)
                self.writer.transport.abort()
                await self.writer.wait_closed()
        except (
            BrokenPipeError,
            ConnectionAbortedError,
            ConnectionResetError,
            RuntimeError,
            asyncio.CancelledError,
        ):
            pass  # Already closed (as hypercorn's own _close)
        finally:
            await self.idle_task.stop()

    _close._otterscale_bounded = True  # type: ignore[attr-defined]
    TCPServer._close = _close

    original_read = TCPServer._read_data
    original_protocol_send = TCPServer.protocol_send

    async def _read_data(self: Any) -> None:
        try:
            await original_read(self)
        finally:
            # The peer is gone (or the read failed): the keep-alive timer must not hold the
            # connection open. hypercorn stops it only after the connection's task group has
            # ended, and the group waits for the timer: every connection closed by its peer while
            # idle stayed open (CLOSE_WAIT) for the whole keep_alive_timeout (120 s here).
            self._otterscale_peer_gone = True
            await self.idle_task.stop()

    async def protocol_send(self: Any, event: Any) -> None:
        if isinstance(event, Updated) and getattr(self, "_otterscale_peer_gone", False):
            return  # an application that ends later would start the timer again
        await original_protocol_send(self, event)

    TCPServer._read_data = _read_data
    TCPServer.protocol_send = protocol_send
    return True


async def _reset_unfinished(protocol: Any, stream_id: int) -> None:
    import h2.errors
    import h2.exceptions
    import h2.stream

    buffer = protocol.stream_buffers.get(stream_id)
    # A finished body marks its buffer complete; trailers close the stream locally. Either way
    # the response ended normally and hypercorn ends the stream itself.
    if buffer is None or buffer._complete:
        return
    stream = protocol.connection.streams.get(stream_id)
    open_locally = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)
    if stream is None or stream.state_machine.state not in open_locally:
        return
    try:
        protocol.connection.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await protocol._flush()
    except h2.exceptions.ProtocolError:
        return  # the connection is going away anyway
    finally:
        await buffer.close()
        protocol.stream_buffers.pop(stream_id, None)
        try:
            protocol.priority.remove_stream(stream_id)
        except MissingStreamError:  # the scheduler already dropped it
            logger.debug("stream %d was not scheduled", stream_id)


def _install_late_data() -> bool:
    """Drop request data for streams hypercorn has finished (item 6 of the module docstring).

    Wraps ``H2Protocol._handle_events``. Returns whether the change is in place; False, with a
    warning, for an unexpected hypercorn.
    """
    import h2.events
    from hypercorn.protocol.h2 import H2Protocol

    original = H2Protocol._handle_events
    if getattr(original, "_otterscale_late_data", False):
        return True
    if not _supported("request data after an answer drops the whole HTTP/2 connection"):
        return False

    @functools.wraps(original)
    async def _handle_events(self: Any, events: list[Any]) -> None:
        batch: list[Any] = []
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                if batch:  # the events before it may create the stream: handle them first
                    await original(self, batch)
                    batch = []
                if event.stream_id not in self.streams:
                    self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    continue
            batch.append(event)
        await original(self, batch)

    _handle_events._otterscale_late_data = True  # type: ignore[attr-defined]
    H2Protocol._handle_events = _handle_events
    return True


def tune_hypercorn() -> bool:
    """Apply the six changes of the module docstring to hypercorn, once per process.

    Call it before serving (:func:`otterscale.common.serve` does). Returns whether all of them
    are in place: False, with a warning logged, when the installed hypercorn is not the version
    they were written for (it then runs unchanged).
    """
    scheduler = _install_scheduler_and_cache()
    flow = _install_flow_fixes()
    close = _install_bounded_close()
    late = _install_late_data()
    return scheduler and flow and close and late
