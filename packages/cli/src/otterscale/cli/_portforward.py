"""``otterscale port-forward POD [LOCAL:]REMOTE...``: local ports to a pod's ports, through the hub.

Each local TCP connection is one session (one connection to the pod's port), as with the
original API: with ``--http2`` (or gRPC) one PortForwardStream carries both directions; otherwise
bytes from the local side go out with WritePortForward in order (with offsets) and bytes from
the pod come back on the PortForward stream. Kubernetes' WebSocket
port-forward cannot half-close, so when the local side stops sending the session stays open
until the pod closes the connection or the local side closes entirely. Ctrl-C stops listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TextIO

from otterscale.common import UsageError
from otterscale.runtime.v1 import runtime_pb2 as pb
from otterscale.runtime.v1.runtime_connect import RuntimeServiceClient

from ._input import OrderedWriter
from ._options import ClientOptions, add_client_arguments, open_client, run_command

logger = logging.getLogger(__name__)

__all__ = ["PortMapping", "build_parser", "main", "parse_ports", "serve"]

_READ = 64 * 1024


@dataclasses.dataclass(frozen=True)
class PortMapping:
    local: int  # 0: any free port
    remote: int


def parse_ports(specs: Sequence[str]) -> list[PortMapping]:
    """``8080`` (same port locally), ``8080:80``, ``:80`` (any free local port)."""
    mappings = []
    for spec in specs:
        local_text, colon, remote_text = spec.rpartition(":")
        if not colon:
            local_text = remote_text
        try:
            local = int(local_text) if local_text else 0
            remote = int(remote_text)
        except ValueError:
            raise UsageError(f"{spec!r}: expected [LOCAL:]REMOTE port numbers, e.g. 8080:80") from None
        if not 0 <= local <= 65535 or not 1 <= remote <= 65535:
            raise UsageError(f"{spec!r}: ports must be between 1 and 65535")
        mappings.append(PortMapping(local, remote))
    if not mappings:
        raise UsageError("no ports: otterscale port-forward POD [LOCAL:]REMOTE ...")
    return mappings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otterscale port-forward",
        description="Forward local ports to a pod (PortForward through the hub, as the calling user).",
    )
    parser.add_argument("pod", help="the pod's name")
    parser.add_argument("ports", nargs="+", help="[LOCAL:]REMOTE, e.g. 8080:80 (:80 picks a free local port)")
    parser.add_argument(
        "--address", default="127.0.0.1", help="local address to listen on (default 127.0.0.1)"
    )
    add_client_arguments(parser)
    return parser


async def _connection(
    client: RuntimeServiceClient,
    options: ClientOptions,
    pod: str,
    remote: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """One local connection = one session: copy both ways until either side ends."""
    request = pb.PortForwardRequest(
        cluster=options.cluster, namespace=options.namespace, name=pod, port=remote
    )
    stream = client.port_forward(request)
    messages = aiter(stream)
    pump: asyncio.Task[None] | None = None
    try:
        first = await anext(messages)
        session_id = first.session_id

        async def send(data: bytes, offset: int, close: bool) -> None:
            await client.write_port_forward(
                pb.WritePortForwardRequest(session_id=session_id, data=data, offset=offset)
            )

        outgoing = OrderedWriter(send, can_close=False)

        async def local_to_pod() -> None:
            sender = asyncio.get_running_loop().create_task(outgoing.run(), name="otterscale-pf-sender")
            try:
                while data := await reader.read(_READ):
                    outgoing.feed(data)
                outgoing.close()
                await sender
            finally:
                sender.cancel()

        pump = asyncio.get_running_loop().create_task(local_to_pod(), name="otterscale-pf-local")
        async for message in messages:
            if message.data:
                writer.write(message.data)
                await writer.drain()
    except Exception as exc:
        logger.warning("port-forward to %s:%d ended: %s", pod, remote, exc)
        sys.stderr.write(f"otterscale port-forward: connection to {pod}:{remote} ended: {exc}\n")
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        aclose = getattr(messages, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _stream_connection(
    client: RuntimeServiceClient,
    options: ClientOptions,
    pod: str,
    remote: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """One local connection as one PortForwardStream (HTTP/2): the local side's bytes are read
    only as fast as the stream takes them."""
    start = pb.PortForwardRequest(cluster=options.cluster, namespace=options.namespace, name=pod, port=remote)

    async def requests() -> AsyncIterator[pb.PortForwardStreamRequest]:
        yield pb.PortForwardStreamRequest(start=start)
        while data := await reader.read(_READ):
            yield pb.PortForwardStreamRequest(data=data)

    responses = aiter(client.port_forward_stream(requests()))
    try:
        async for message in responses:
            if message.data:
                writer.write(message.data)
                await writer.drain()
    except Exception as exc:
        sys.stderr.write(f"otterscale port-forward: connection to {pod}:{remote} ended: {exc}\n")
    finally:
        with contextlib.suppress(Exception):
            await responses.aclose()  # type: ignore[attr-defined]
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(
    args: argparse.Namespace,
    options: ClientOptions,
    *,
    out: TextIO | None = None,
    ready: asyncio.Future[list[int]] | None = None,
) -> int:
    """Listen until cancelled; ``ready`` gets the local ports once listening (tests)."""
    mappings = parse_ports(args.ports)
    out = out or sys.stdout
    async with open_client(options) as client:
        servers = []
        connections: set[asyncio.Task[None]] = set()
        try:
            for mapping in mappings:

                def handle(
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: int = mapping.remote
                ) -> None:
                    task = asyncio.get_running_loop().create_task(
                        _connection(client, options, args.pod, remote, reader, writer),
                        name="otterscale-pf-conn",
                    )
                    connections.add(task)
                    task.add_done_callback(connections.discard)

                server = await asyncio.start_server(handle, args.address, mapping.local)
                servers.append(server)
                port = server.sockets[0].getsockname()[1]
                out.write(f"Forwarding from {args.address}:{port} -> {mapping.remote}\n")
                out.flush()
            if ready is not None:
                ready.set_result([s.sockets[0].getsockname()[1] for s in servers])
            await asyncio.gather(*(s.serve_forever() for s in servers))
        finally:
            for server in servers:
                server.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``otterscale port-forward`` (entry point of the ``otterscale`` command)."""
    return run_command("port-forward", build_parser(), argv, serve)
