"""Warm connections from the hub to every agent, through the agents' tunnel ports.

One pyqwest HTTP transport (Rust, reqwest/hyper) speaks HTTP/2 with prior knowledge (h2c) to
``http://127.0.0.1:<tunnel_port>``. Each tunnel port therefore carries one long-lived TCP
connection, that is one chisel SSH channel, and every call and Watch of that cluster is a stream
multiplexed on it: no TCP handshake, no SSH channel set-up per request, and 1,000 Watches cost
1,000 HTTP/2 streams rather than 1,000 connections. When a tunnel closes, chisel closes the
connection and the next call opens a new one.

Streams (Watch and every other) get their own transports (at least :data:`STREAM_TRANSPORTS` of
them, each its own HTTP/2 connection per agent), so unary calls never wait behind long-lived
streams: an HTTP/2 server caps concurrent streams per connection (the agent's hypercorn at 1000),
and a client at that cap queues new requests. A stream takes the stream transport with the fewest open streams
for its cluster; when every one already carries :data:`STREAMS_PER_CONNECTION`, another
transport (connection) is opened, up to :data:`MAX_STREAM_TRANSPORTS`. Many streams on one
connection are costly for a pure-Python HTTP/2 server (hypercorn's per-frame work grows with the
open streams on the connection), while an extra connection through the tunnel costs one SSH
channel and a few KiB; connections left without streams close after the pool's idle timeout.

Per cluster and transport there are two Connect clients, one per codec (binary and JSON), whose
codec passes message bytes through untouched (:mod:`._proxy`): the agent answers in the codec
the user asked for and the hub never decodes a response. Responses may be large (a List of
thousands of objects), so they are read up to ``max_response_bytes`` (``limits``, default
:data:`MAX_RESPONSE_BYTES`): unary answers through :class:`._limits.BoundedTransport`, which
stops reading there; each streamed message through connectrpc's ``read_max_bytes``.

Close with :meth:`AgentClients.aclose`: a process that exits with an open pyqwest transport can
abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping

from connectrpc.client import ConnectClient
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.cluster.v1.cluster_connect import AgentServiceClient
from otterscale.cluster.v1.cluster_pb2 import GetAgentInfoRequest
from otterscale.common import LOOPBACK, Identity, sign_identity

from ._codec import CODEC_JSON, CODEC_PROTO, PassthroughCodec
from ._limits import DEFAULT_MAX_RESPONSE_BYTES, BoundedTransport

logger = logging.getLogger(__name__)

#: Largest response accepted from an agent by default (``limits.max_response_bytes``, see ``_limits``).
MAX_RESPONSE_BYTES = DEFAULT_MAX_RESPONSE_BYTES
#: Separate HTTP/2 connections per agent for streams (Watch), besides the one for unary calls.
STREAM_TRANSPORTS = 4
#: Open streams per stream connection before another connection is opened (bench --only watch).
STREAMS_PER_CONNECTION = 32
#: At most this many stream connections per agent; beyond, streams share the least loaded.
MAX_STREAM_TRANSPORTS = 64
#: The identity the hub signs its own calls to agents with (AgentService).
HUB_IDENTITY = Identity(subject="otterscale-hub")
GET_AGENT_INFO = "/otterscale.cluster.v1.AgentService/GetAgentInfo"


class AgentClients:
    """Connect clients for every cluster's agent over shared HTTP/2 transports."""

    def __init__(
        self,
        ports: Mapping[str, int],
        keys: Mapping[str, bytes],
        *,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._max_response_bytes = max_response_bytes
        # Index 0 serves unary calls; 1.. serve streams (more are added on demand, see above).
        self._transports = [_transport() for _ in range(1 + STREAM_TRANSPORTS)]
        # Unary answers are bounded while read (connectrpc's client would buffer them whole first).
        self._http = [Client(BoundedTransport(self._transports[0], max_response_bytes))]
        self._http += [Client(transport) for transport in self._transports[1:]]
        self._keys = dict(keys)
        self._urls = {name: f"http://{LOOPBACK}:{port}" for name, port in ports.items()}
        # (cluster, codec) -> one client per transport, created when first used.
        self._clients: dict[tuple[str, str], list[ConnectClient | None]] = {
            (name, codec): [self._connect_client(url, codec, 0)]
            for name, url in self._urls.items()
            for codec in (CODEC_PROTO, CODEC_JSON)
        }
        # cluster -> open streams per stream transport (index i is transport 1 + i).
        self._open_streams = {name: [0] * STREAM_TRANSPORTS for name in self._urls}
        self._info = {
            name: AgentServiceClient(
                url, accept_compression=(), send_compression=None, http_client=self._http[0]
            )
            for name, url in self._urls.items()
        }

    def _connect_client(self, url: str, codec: str, index: int) -> ConnectClient:
        return ConnectClient(
            url,
            codec=PassthroughCodec(codec),
            protocol=ProtocolType.CONNECT,
            accept_compression=(),
            send_compression=None,
            read_max_bytes=self._max_response_bytes,
            http_client=self._http[index],
        )

    def _client_at(self, cluster: str, codec: str, index: int) -> ConnectClient:
        clients = self._clients[(cluster, codec)]
        if len(clients) <= index:
            clients.extend([None] * (index + 1 - len(clients)))
        client = clients[index]
        if client is None:
            client = clients[index] = self._connect_client(self._urls[cluster], codec, index)
        return client

    def client(self, cluster: str, codec: str) -> ConnectClient:
        """The unary client for ``cluster``'s agent that passes ``codec`` ("proto"/"json") through."""
        return self._client_at(cluster, codec, 0)

    @contextlib.contextmanager
    def stream_client(self, cluster: str, codec: str) -> Iterator[ConnectClient]:
        """A client for one stream: the least loaded stream connection, a new one if all are full."""
        counts = self._open_streams[cluster]
        index = min(range(len(counts)), key=counts.__getitem__)
        if counts[index] >= STREAMS_PER_CONNECTION and len(counts) < MAX_STREAM_TRANSPORTS:
            index = len(counts)
            counts.append(0)
            if len(self._transports) <= 1 + index:
                self._transports.append(_transport())
                self._http.append(Client(self._transports[-1]))
        counts[index] += 1
        try:
            yield self._client_at(cluster, codec, 1 + index)
        finally:
            counts[index] -= 1

    async def ping(self, cluster: str, *, within: float) -> float:
        """``GET /ping`` through the tunnel; the round trip in seconds. Raises ConnectionError."""
        started = time.perf_counter()
        try:
            response = await asyncio.wait_for(self._http[0].get(self._urls[cluster] + "/ping"), within)
        except TimeoutError:
            raise ConnectionError(f"no answer to /ping within {within:g}s") from None
        except Exception as exc:
            raise ConnectionError(_transport_reason(exc)) from exc
        elapsed = time.perf_counter() - started
        if response.status not in (200, 204):
            raise ConnectionError(f"/ping answered HTTP {response.status}")
        return elapsed

    async def agent_info(self, cluster: str, *, within: float) -> tuple[str, str] | None:
        """The agent's (version, Kubernetes version), or None if it does not implement AgentService."""
        headers = sign_identity(HUB_IDENTITY, cluster=cluster, method=GET_AGENT_INFO, key=self._keys[cluster])
        try:
            info = await self._info[cluster].get_agent_info(
                GetAgentInfoRequest(), headers=headers, timeout_ms=int(within * 1000)
            )
        except ConnectError as exc:
            if exc.code in (Code.UNIMPLEMENTED, Code.NOT_FOUND):
                return None
            raise
        return info.agent_version, info.kubernetes_version

    async def aclose(self) -> None:
        """Close every connection (idempotent)."""
        for clients in self._clients.values():
            for client in clients:
                if client is not None:
                    await client.close()
        for info in self._info.values():
            await info.close()
        for transport in self._transports:
            await transport.aclose()


def _transport() -> HTTPTransport:
    return HTTPTransport(
        http_version=HTTPVersion.HTTP2,
        connect_timeout=3.0,
        pool_idle_timeout=90.0,
        tcp_keepalive_interval=30.0,
        enable_gzip=False,
        enable_brotli=False,
        enable_zstd=False,
        follow_redirects=False,
        enable_otel=False,
    )


def _transport_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
