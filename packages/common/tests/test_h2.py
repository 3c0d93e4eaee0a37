"""The hypercorn HTTP/2 changes (otterscale.common._h2): the round-robin scheduler keeps
priority.PriorityTree's contract for the calls hypercorn makes, a
real hypercorn server still serves many concurrent streams (small and flow-controlled big ones)
correctly with it installed, and cached Huffman decoding gives hpack's answers.

Tests of the hypercorn patches (marker ``hypercorn``): they stand or fall with
``otterscale.common._h2`` and ``serve()`` on hypercorn, and are deleted with them when the hub and
the agent leave hypercorn. What the patches are for is tested at the services' ports
(``packages/hub/tests``: slow readers over h2 and HTTP/1.1, refusals before a body ended, 1000+
calls on one connection, many Watches at once), and stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import priority
import pytest
from hypercorn.protocol.h2 import H2Protocol
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import create_listener, serve, tune_hypercorn
from otterscale.common._h2 import RoundRobinScheduler, cached_huffman_decoder

pytestmark = pytest.mark.hypercorn


def _call(target: object, name: str, *args: int) -> object:
    try:
        return getattr(target, name)(*args)
    except priority.PriorityError as exc:
        return type(exc)


@pytest.mark.parametrize("seed", range(20))
def test_same_answers_as_priority_tree(seed: int) -> None:
    """Random hypercorn-like call sequences: the same errors at the same points, and a stream
    handed out is always one that is unblocked (ordering among them may differ)."""
    rng = random.Random(seed)
    tree = priority.PriorityTree(maximum_streams=40)
    ours = RoundRobinScheduler(maximum_streams=40)
    unblocked: set[int] = set()
    known: set[int] = set()
    for _ in range(3000):
        op = rng.choice(("insert", "remove", "block", "unblock", "unblock", "next", "next", "next"))
        if op == "next":
            got_tree, got_ours = _call(tree, "__next__"), _call(ours, "__next__")
            if got_tree is priority.DeadlockError:
                assert got_ours is priority.DeadlockError
            else:
                assert got_ours in unblocked
            continue
        stream_id = rng.randrange(0, 60)
        assert _call(tree, op + "_stream" if op in ("insert", "remove") else op, stream_id) == _call(
            ours, op + "_stream" if op in ("insert", "remove") else op, stream_id
        )
        if op == "insert" and stream_id not in known and stream_id and len(known) + 2 <= 40:
            known.add(stream_id)
            unblocked.add(stream_id)
        elif op == "remove":
            known.discard(stream_id)
            unblocked.discard(stream_id)
        elif op == "block":
            unblocked.discard(stream_id)
        elif op == "unblock" and stream_id in known:
            unblocked.add(stream_id)


def test_round_robin_is_fair() -> None:
    scheduler = RoundRobinScheduler()
    for stream_id in range(1, 999, 2):
        scheduler.insert_stream(stream_id)
        scheduler.block(stream_id)  # as hypercorn does for a new request
    for stream_id in (5, 7, 9):
        scheduler.unblock(stream_id)
    assert [next(scheduler) for _ in range(6)] == [5, 7, 9, 5, 7, 9]
    scheduler.unblock(7)  # already waiting: keeps its place
    scheduler.block(5)
    assert [next(scheduler) for _ in range(4)] == [7, 9, 7, 9]
    scheduler.remove_stream(9)
    assert next(scheduler) == 7
    with pytest.raises(priority.MissingStreamError):
        scheduler.unblock(9)
    scheduler.reprioritize(7, depends_on=3, weight=200)  # accepted, ignored
    with pytest.raises(priority.PriorityLoop):
        scheduler.reprioritize(7, depends_on=7)
    scheduler.block(7)
    with pytest.raises(priority.DeadlockError):
        next(scheduler)


def test_install_is_idempotent_and_replaces_the_tree() -> None:
    assert tune_hypercorn()
    assert tune_hypercorn()
    assert getattr(H2Protocol.__init__, "_otterscale_round_robin", False)
    assert getattr(H2Protocol.stream_send, "_otterscale_stream_reset", False)
    from hypercorn.asyncio.tcp_server import TCPServer

    assert getattr(TCPServer._close, "_otterscale_bounded", False)


async def _app(scope: dict[str, object], receive: object, send: object) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()  # type: ignore[operator]
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})  # type: ignore[operator]
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})  # type: ignore[operator]
                return
    path = str(scope["path"]).strip("/")
    size, chunks, delay = (int(part) for part in path.split("-"))
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    piece = size // chunks
    for i in range(chunks):
        await asyncio.sleep(delay / 1000)
        body = bytes([i % 256]) * piece
        await send({"type": "http.response.body", "body": body, "more_body": True})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]


async def test_hypercorn_serves_many_streams_with_it() -> None:
    """300 concurrent streams on one HTTP/2 connection, a few of them megabytes (flow control
    blocks and unblocks them), interleaved with slow trickling ones, all complete and intact."""
    sock = create_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    server = asyncio.create_task(serve(_app, sock, shutdown, graceful_timeout=5), name="test-h2-server")
    transport = HTTPTransport(http_version=HTTPVersion.HTTP2)
    client = Client(transport)
    try:
        paths = [
            f"{3_000_000 if i % 50 == 0 else 300 * (i % 7 + 1)}-{3 if i % 50 == 0 else 5}-{i % 3}"
            for i in range(300)
        ]

        async def fetch(path: str) -> bytes:
            # The socket listens already, so connecting before hypercorn runs just waits.
            response = await client.get(f"http://127.0.0.1:{port}/{path}")
            assert response.status == 200
            return bytes(response.content)

        bodies = await asyncio.wait_for(asyncio.gather(*(fetch(p) for p in paths)), 60)
        for path, body in zip(paths, bodies, strict=True):
            size, chunks, _ = (int(part) for part in path.split("-"))
            piece = size // chunks
            assert body == b"".join(bytes([i % 256]) * piece for i in range(chunks))
    finally:
        await transport.aclose()
        shutdown.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(server, 10)


def test_cached_huffman_decoding_gives_hpacks_answers() -> None:
    import hpack
    import hpack.hpack
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
    from hpack.huffman_table import decode_huffman

    assert tune_hypercorn()
    assert hpack.hpack.decode_huffman is not decode_huffman  # the cached one is in place
    encode = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode
    decode = cached_huffman_decoder(decode_huffman)
    rng = random.Random(7)
    values = [b"", b"x", bytes(range(256)), b"Bearer " + bytes(rng.randrange(33, 127) for _ in range(1500))]
    values += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(200)]
    for value in values:
        encoded = encode(value)
        for form in (encoded, bytearray(encoded), memoryview(encoded), encoded):  # cold, then cached
            assert decode(form) == value == decode_huffman(encoded)
    bad = b"\xff" * 40  # the EOS code and more: not a valid Huffman string
    with pytest.raises(hpack.HPACKDecodingError):
        decode_huffman(bad)
    for _ in range(2):  # errors are raised every time, never cached
        with pytest.raises(hpack.HPACKDecodingError):
            decode(bad)
    # Through a real header block: the never-indexed bearer token decodes the same every time.
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    token = "Bearer " + "".join(rng.choice("abcXYZ0123-_.") for _ in range(900))
    headers = [(":method", "POST"), hpack.NeverIndexedHeaderTuple("authorization", token)]
    for _ in range(3):
        assert decoder.decode(encoder.encode(headers, huffman=True)) == [
            (":method", "POST"),
            ("authorization", token),
        ]


async def test_a_writer_blocked_on_a_peer_that_left_is_released() -> None:
    """A client that grants no window and then closes the connection: the application, blocked
    sending into a full stream buffer, must be released so the connection (and socket) ends.
    Without the fix it waits forever and the server's socket stays in CLOSE_WAIT."""
    import socket

    import h2.config
    import h2.connection

    tune_hypercorn()
    finished = asyncio.Event()
    sent = 0
    stop = False

    async def endless(scope: dict[str, object], receive: object, send: object) -> None:
        nonlocal sent
        if scope["type"] == "lifespan":
            await _app(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
            while not stop:
                await send({"type": "http.response.body", "body": b"x" * 16384, "more_body": True})  # type: ignore[operator]
                sent += 1
                await asyncio.sleep(0)  # as a real application waits for its next event
        finally:
            finished.set()

    sock = create_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    server = asyncio.create_task(serve(endless, sock, shutdown, graceful_timeout=1), name="test-h2-server")
    try:
        client = socket.create_connection(("127.0.0.1", port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1})
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")],
            end_stream=True,
        )
        client.sendall(conn.data_to_send())
        await asyncio.sleep(0.5)  # the app fills the stream's buffer and blocks in send
        blocked_at = sent
        await asyncio.sleep(0.3)
        assert sent == blocked_at, "the application was never blocked: no backpressure"
        assert not finished.is_set()
        client.close()  # the peer leaves without reading
        # The blocked send returns (hypercorn drops what is sent to a closed connection).
        deadline = asyncio.get_running_loop().time() + 5
        while sent == blocked_at and not finished.is_set():
            assert asyncio.get_running_loop().time() < deadline, "the blocked send was never released"
            await asyncio.sleep(0.05)
        stop = True
        await asyncio.wait_for(finished.wait(), 5)
    finally:
        shutdown.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(server, 10)


async def test_an_http1_connection_whose_peer_reads_nothing_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The application gives up on a client that reads nothing (as the hub's Watch send timeout
    does) and hypercorn closes the connection, but its own close waits without a bound for the
    write buffer to go out: the server's socket stayed open for as long as the client's did.
    (Over HTTP/2 the stream is reset and the connection lives on: see the stream reset tests.)"""
    import socket

    from otterscale.common import _h2

    monkeypatch.setattr(_h2, "CLOSE_TIMEOUT", 1.0)
    tune_hypercorn()
    gave_up = asyncio.Event()

    async def endless(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "lifespan":
            await _app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        try:
            while True:
                async with asyncio.timeout(0.5):
                    await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})  # type: ignore[operator]
        except TimeoutError:
            gave_up.set()  # returns without finishing the response

    sock = create_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    server = asyncio.create_task(serve(endless, sock, shutdown, graceful_timeout=1), name="test-h2-server")
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(gave_up.wait(), 30)
        local = client.getsockname()[1]
        await _released(port, local, within=_h2.CLOSE_TIMEOUT + 3)
    finally:
        client.close()
        shutdown.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(server, 15)


@pytest.mark.parametrize("version", ["http1", "h2c"])
async def test_a_connection_closed_by_its_peer_while_idle_is_released_at_once(version: str) -> None:
    """A client makes a call, then closes its idle connection: the server's socket must go at
    once, not when the keep-alive timer (120 s) runs out. Without the fix every connection cut
    while idle (a hub or tunnel restarting) stayed in CLOSE_WAIT for two minutes."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    from otterscale.testing import holds_socket

    tune_hypercorn()
    sock = create_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    server = asyncio.create_task(serve(_app, sock, shutdown, graceful_timeout=1), name="test-h2-server")
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, ("127.0.0.1", port))
        if version == "http1":
            await loop.sock_sendall(client, b"GET /100-1-0 HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"0\r\n\r\n"):  # the chunked body's end
                answer += await loop.sock_recv(client, 65536)
            assert answer.startswith(b"HTTP/1.1 200")
        else:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(
                1,
                [(":method", "GET"), (":path", "/100-1-0"), (":scheme", "http"), (":authority", "x")],
                end_stream=True,
            )
            await loop.sock_sendall(client, conn.data_to_send())
            ended = False
            while not ended:
                for event in conn.receive_data(await loop.sock_recv(client, 65536)):
                    ended = ended or isinstance(event, h2.events.StreamEnded)
                await loop.sock_sendall(client, conn.data_to_send())
        local = client.getsockname()[1]
        await asyncio.sleep(0.2)  # idle: hypercorn's keep-alive timer runs
        assert holds_socket(local_port=port, remote_port=local)
        client.close()
        await _released(port, local, within=2)
    finally:
        client.close()
        shutdown.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(server, 15)


async def test_request_data_after_the_answer_keeps_the_connection() -> None:
    """A stream answered before its request ended (a client or bidirectional stream refused on its
    first message) gets more request data: the other streams of the connection carry on. Without
    the fix hypercorn raises KeyError on that DATA frame and drops the whole connection."""
    import h2.config
    import h2.connection
    import h2.events

    tune_hypercorn()

    async def answer_at_once(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "lifespan":
            await _app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 403, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"no"})  # type: ignore[operator]

    sock = create_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    server = asyncio.create_task(
        serve(answer_at_once, sock, shutdown, graceful_timeout=1), name="test-h2-late"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    headers = [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "x")]

    async def until_ended(stream_id: int) -> list[object]:
        seen: list[object] = []
        while not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id for e in seen):
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, f"the server closed the connection (events so far: {seen})"
            seen += conn.receive_data(data)
            writer.write(conn.data_to_send())
        return seen

    try:
        conn.initiate_connection()
        first = conn.get_next_available_stream_id()
        conn.send_headers(first, headers)
        conn.send_data(first, b"the first message")
        writer.write(conn.data_to_send())
        await until_ended(first)  # answered while the request is still open
        conn.send_data(first, b"more of the request", end_stream=True)
        second = conn.get_next_available_stream_id()
        conn.send_headers(second, headers, end_stream=True)
        writer.write(conn.data_to_send())
        events = await until_ended(second)
        statuses = [dict(e.headers)[b":status"] for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert statuses == [b"403"], events
    finally:
        writer.close()
        shutdown.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(server, 10)


def test_another_hypercorn_is_left_alone_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from otterscale.common import _h2

    monkeypatch.setattr(_h2.metadata, "version", lambda name: "0.19.0")
    assert not _h2._supported("its own scheduler stays")
    assert "hypercorn 0.19.0: its own scheduler stays (the change is written for 0.18.x)" in caplog.text
    monkeypatch.setattr(_h2.metadata, "version", lambda name: "0.18.0")
    assert _h2._supported("unused")


async def _released(port: int, client_port: int, *, within: float) -> None:
    """Wait until the server (this process) no longer holds the socket of that connection."""
    from otterscale.testing import holds_socket

    deadline = asyncio.get_running_loop().time() + within
    while holds_socket(local_port=port, remote_port=client_port):
        assert asyncio.get_running_loop().time() < deadline, f"the server kept the socket for {within:g}s"
        await asyncio.sleep(0.05)
