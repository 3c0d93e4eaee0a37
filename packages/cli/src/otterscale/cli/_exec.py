"""``otterscale exec POD -- COMMAND...``: run a command in a container through the hub.

``-i`` passes this terminal's stdin (end of input closes the command's stdin, so ``cat`` ends);
``-t`` allocates a terminal in the container and puts this one into raw mode, sending its size
at the start and whenever the window changes. The exit status is the command's. With
``--http2`` (or gRPC) the session is one Exec stream (keystrokes and output on one HTTP/2
stream); otherwise ExecuteTTY with WriteTTY and ResizeTTY calls, which work through any proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, BinaryIO, Protocol

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import UsageError
from otterscale.runtime.v1 import runtime_pb2 as pb
from otterscale.runtime.v1.runtime_connect import RuntimeServiceClient

from ._input import MAX_PENDING, MAX_WRITE, OrderedWriter
from ._options import ClientOptions, add_client_arguments, open_client, run_command
from ._terminal import on_resize, raw_mode, terminal_size

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main", "run"]

_READ = 64 * 1024


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otterscale exec",
        description="Run a command in a container (ExecuteTTY through the hub, as the calling user).",
        usage="otterscale exec POD [-c CONTAINER] [-i] [-t] [connection options] -- COMMAND [ARG...]",
    )
    parser.add_argument("pod", help="the pod's name")
    parser.add_argument("-c", "--container", default="", help="the container (default: as kubectl chooses)")
    parser.add_argument("-i", "--stdin", action="store_true", help="pass stdin to the command")
    parser.add_argument("-t", "--tty", action="store_true", help="allocate a terminal (raw mode here)")
    add_client_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> list[str]:
    command = list(getattr(args, "command", None) or ())
    if not command:
        raise UsageError("no command: otterscale exec POD -- COMMAND [ARG...]")
    return command


class _Feed(Protocol):
    """Where local input goes: an OrderedWriter (WriteTTY) or an Exec stream."""

    def feed(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    async def room(self) -> None: ...


class _Stdin:
    """Feeds local input from a file descriptor: the event loop's reader, or a thread for files.

    Reading pauses while the feed holds too much (``room()``), so a fast producer (a big file
    piped in) is held back by the network instead of filling memory.
    """

    def __init__(self, fd: int, sink: _Feed) -> None:
        self._fd = fd
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._watching = False
        self._ended = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        try:
            self._watch()
        except (PermissionError, OSError):
            # A regular file cannot be polled, but reading it never blocks for long.
            self._task = self._loop.create_task(self._read_file(), name="otterscale-exec-stdin")

    def _watch(self) -> None:
        self._loop.add_reader(self._fd, self._readable)
        self._watching = True

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.stop()
            self._sink.close()
            return
        self._sink.feed(data)
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False
            self._task = self._loop.create_task(self._resume(), name="otterscale-exec-stdin-resume")

    async def _resume(self) -> None:
        await self._sink.room()
        if not self._ended:
            self._watch()

    async def _read_file(self) -> None:
        while True:
            await self._sink.room()
            data = await asyncio.to_thread(os.read, self._fd, _READ)
            if not data:
                break
            self._sink.feed(data)
        self._sink.close()

    def stop(self) -> None:
        self._ended = True
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False
        if self._task is not None:
            self._task.cancel()


class _StreamFeed:
    """Local input as the messages of an Exec stream (HTTP/2): stdin, resizes, close."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[pb.ExecRequest | None] = asyncio.Queue()
        self._pending = 0
        self._room = asyncio.Event()
        self._room.set()

    def feed(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_WRITE):
            chunk = data[start : start + MAX_WRITE]
            self._pending += len(chunk)
            self._queue.put_nowait(pb.ExecRequest(stdin=chunk))
        if self._pending >= MAX_PENDING:
            self._room.clear()

    def close(self) -> None:
        self._queue.put_nowait(pb.ExecRequest(close_stdin=True))

    def resize(self, rows: int, cols: int) -> None:
        self._queue.put_nowait(pb.ExecRequest(resize=pb.TerminalSize(rows=rows, cols=cols)))

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def room(self) -> None:
        await self._room.wait()

    async def messages(self, start: pb.ExecuteTTYRequest) -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=start)
        while (message := await self._queue.get()) is not None:
            self._pending -= len(message.stdin)
            if self._pending < MAX_PENDING:
                self._room.set()
            yield message


async def run(
    args: argparse.Namespace,
    options: ClientOptions,
    *,
    stdin_fd: int | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run the command; returns its exit status."""
    command = _command(args)
    in_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
    request = pb.ExecuteTTYRequest(
        cluster=options.cluster,
        namespace=options.namespace,
        name=args.pod,
        container=args.container,
        command=command,
        tty=args.tty,
        stdin=args.stdin,
    )
    size = terminal_size(in_fd) if args.tty else None
    if size is not None:
        request.rows, request.cols = size
    async with open_client(options) as client:
        if options.http2:
            return await _stream_session(client, request, args, in_fd, out, err)
        return await _session(client, request, args, in_fd, out, err)


async def _stream_session(
    client: RuntimeServiceClient,
    request: pb.ExecuteTTYRequest,
    args: argparse.Namespace,
    in_fd: int,
    out: BinaryIO,
    err: BinaryIO,
) -> int:
    """The session as one Exec stream (HTTP/2): keystrokes and output share it, no extra calls."""
    feed = _StreamFeed()
    responses = aiter(client.exec(feed.messages(request)))
    stdin: _Stdin | None = None
    try:
        await anext(responses)  # empty: the command runs
        if args.stdin:
            stdin = _Stdin(in_fd, feed)
            stdin.start()
        return await _print_output(responses, args, in_fd, out, err, feed.resize)
    finally:
        if stdin is not None:
            stdin.stop()
        feed.end()


async def _print_output(
    messages: AsyncIterator[Any],
    args: argparse.Namespace,
    in_fd: int,
    out: BinaryIO,
    err: BinaryIO,
    resize: Callable[[int, int], None],
) -> int:
    """Write the command's output here (raw terminal with -t); return its exit status."""
    exit_code = 0
    with contextlib.ExitStack() as terminal:
        if args.tty:
            terminal.enter_context(raw_mode(in_fd))
            terminal.enter_context(on_resize(in_fd, resize))
        async for message in messages:
            if message.stdout:
                out.write(message.stdout)
                out.flush()
            if message.stderr:
                err.write(message.stderr)
                err.flush()
            if message.HasField("exit_code"):
                exit_code = message.exit_code
    return exit_code


async def _session(
    client: RuntimeServiceClient,
    request: pb.ExecuteTTYRequest,
    args: argparse.Namespace,
    in_fd: int,
    out: BinaryIO,
    err: BinaryIO,
) -> int:
    messages = aiter(client.execute_tty(request))
    first = await anext(messages)
    session_id = first.session_id
    writer_task: asyncio.Task[None] | None = None
    stdin: _Stdin | None = None
    resizes: set[asyncio.Task[None]] = set()

    async def send(data: bytes, offset: int, close: bool) -> None:
        try:
            await client.write_tty(
                pb.WriteTTYRequest(session_id=session_id, stdin=data, offset=offset, close_stdin=close)
            )
        except ConnectError as exc:
            if close and exc.code is Code.FAILED_PRECONDITION:
                logger.debug("the cluster cannot close stdin: %s", exc.message)
                return
            raise

    def resize(rows: int, cols: int) -> None:
        task = asyncio.get_running_loop().create_task(
            client.resize_tty(pb.ResizeTTYRequest(session_id=session_id, rows=rows, cols=cols)),
            name="otterscale-exec-resize",
        )
        resizes.add(task)
        task.add_done_callback(resizes.discard)

    if args.stdin:
        writer = OrderedWriter(send)
        writer_task = asyncio.get_running_loop().create_task(writer.run(), name="otterscale-exec-writer")
        stdin = _Stdin(in_fd, writer)
        stdin.start()
    try:
        return await _print_output(messages, args, in_fd, out, err, resize)
    finally:
        if stdin is not None:
            stdin.stop()
        for task in (writer_task, *resizes):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (writer_task, *resizes) if t is not None), return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``otterscale exec`` (entry point of the ``otterscale`` command)."""
    return run_command("exec", build_parser(), argv, run, command_after_dashes=True)
