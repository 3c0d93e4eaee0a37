"""A thin raw-JSON Kubernetes client over aiohttp: the agent's only way to talk to kube-apiserver.

Why not ``kubernetes.aio``'s ApiClient/dynamic client: building typed models is slow for big
lists, its shared default headers override per-call ones (impersonation must never leak between
callers), a list-valued ``Impersonate-Group`` raises, and its watch lacks bookmarks and has a
300 s total timeout. Here every call gets exactly the headers it needs, bodies stay bytes until
the caller decides how to decode them, and a watch has no total timeout.

Impersonation: when a call carries a caller, ``Impersonate-User`` is the subject and one
``Impersonate-Group`` header is sent per group plus ``system:authenticated``. Calls without a
caller (discovery, OpenAPI) use the agent's own credentials. Nothing here is shared between
calls except the connection pool and the agent's own Authorization header.

Never logs request bodies or credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import orjson
from multidict import CIMultiDict

from ._errors import KubernetesAPIError, KubernetesTimeoutError, KubernetesUnavailableError
from ._kubeconfig import KubeConnection

logger = logging.getLogger(__name__)

__all__ = ["Answer", "Caller", "KubeClient", "impersonation_headers", "iter_lines", "loads"]

#: Default per-call timeout when the client sent no deadline (watches have none at all).
DEFAULT_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
#: Largest single watch event line accepted (etcd's object limit is 1.5 MiB; JSON adds some).
MAX_EVENT_BYTES = 16 * 1024 * 1024
#: How long the WebSocket upgrade of an exec or port-forward may take.
UPGRADE_TIMEOUT = 30.0
#: Largest WebSocket message accepted from kube-apiserver (its stream chunks are 32 KiB or less).
MAX_WEBSOCKET_MESSAGE = 4 * 1024 * 1024


def loads(data: bytes) -> Any:
    """Decode kube-apiserver's JSON: orjson (3x faster than ``json.loads`` on a watch event, ~10 %
    on a 5,000-item List), with the standard library's answer wherever orjson refuses an input
    ``json.loads`` accepts.

    orjson rejects NaN/Infinity, numbers beyond a double's range, lone surrogates, a byte-order
    mark and UTF-16/32; those (never sent by kube-apiserver) fall back to ``json.loads``, so what
    decodes, and the ValueError for what does not, stay as before. One difference is accepted:
    an integer beyond 64 bits decodes to the nearest float instead of an int, the same double a
    ``google.protobuf.Struct`` carries anyway (packages/agent/tests/test_structs.py checks that
    the Struct bytes agree).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class Caller(Protocol):
    """Whom a call impersonates (``otterscale.common.Identity`` fits)."""

    @property
    def subject(self) -> str: ...

    @property
    def groups(self) -> Sequence[str]: ...


def impersonation_headers(caller: Caller) -> list[tuple[str, str]]:
    """The impersonation headers for one call: the user, each group, and system:authenticated."""
    headers = [("Impersonate-User", caller.subject)]
    seen: set[str] = set()
    for group in (*caller.groups, "system:authenticated"):
        if group and group not in seen:
            seen.add(group)
            headers.append(("Impersonate-Group", group))
    return headers


def _socket_factory(addr_info: Any) -> socket.socket:
    """Sockets to kube-apiserver: TCP_NODELAY (small requests, latency-bound) and keepalive.

    Keepalive probes detect a dead apiserver under a quiet watch, which has no read timeout.
    """
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """One response of kube-apiserver, read whole."""

    status: int
    body: bytes
    content_type: str
    location: str = ""

    def error(self) -> KubernetesAPIError:
        """The failure this answer reports (its Status object when it carries one)."""
        return _api_error(self.status, self.body)


class KubeClient:
    """Raw JSON access to one kube-apiserver; create with :meth:`open`, close with :meth:`close`."""

    def __init__(self, connection: KubeConnection, session: aiohttp.ClientSession, user_agent: str) -> None:
        self._conn = connection
        self._session = session
        self._user_agent = user_agent

    @classmethod
    async def open(cls, connection: KubeConnection, *, user_agent: str = "otterscale-agent") -> KubeClient:
        """A client with its own connection pool (must be called inside the running loop)."""
        connector = aiohttp.TCPConnector(
            ssl=connection.ssl_context if connection.ssl_context is not None else False,
            limit=0,  # open watches each hold a connection; a pool limit would stall new calls
            keepalive_timeout=60,
            socket_factory=_socket_factory,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
            auto_decompress=True,
            raise_for_status=False,
            trust_env=False,
        )
        return cls(connection, session, user_agent)

    @property
    def server(self) -> str:
        return self._conn.server

    async def close(self) -> None:
        await self._session.close()

    async def _headers(
        self, caller: Caller | None, accept: str, content_type: str | None
    ) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Accept"] = accept
        headers["User-Agent"] = self._user_agent
        # Loopback/in-cluster bandwidth is plentiful and CPU is not: skip gzip both ways.
        headers["Accept-Encoding"] = "identity"
        authorization = await self._conn.authorization()
        if authorization:
            headers["Authorization"] = authorization
        if content_type:
            headers["Content-Type"] = content_type
        if caller is not None:
            for name, value in impersonation_headers(caller):
                headers.add(name, value)
        return headers

    def _request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._conn.tls_server_name:
            kwargs["server_hostname"] = self._conn.tls_server_name
        if self._conn.proxy:
            kwargs["proxy"] = self._conn.proxy
        return kwargs

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        caller: Caller | None = None,
        accept: str = "application/json",
        time_limit: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """kube-apiserver's answer whatever its status; redirects are never followed.

        For the few callers that act on a non-2xx status themselves (a 304 or 301 of a
        conditional GET); everything else uses :meth:`request`.
        """
        headers = await self._headers(caller, accept, content_type if body is not None else None)
        for name, value in (extra_headers or {}).items():
            headers[name] = value
        try:
            async with self._session.request(
                method,
                self._conn.server + path,
                params=params,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=time_limit if time_limit is not None else DEFAULT_TIMEOUT,
                    sock_connect=CONNECT_TIMEOUT,
                ),
                allow_redirects=False,
                **self._request_kwargs(),
            ) as resp:
                data = await resp.read()
                return Answer(
                    resp.status,
                    data,
                    resp.headers.get("Content-Type", ""),
                    resp.headers.get("Location", ""),
                )
        except TimeoutError as exc:
            raise KubernetesTimeoutError(f"kubernetes API did not answer {method} {path} in time") from exc
        except aiohttp.ClientError as exc:
            raise KubernetesUnavailableError(f"kubernetes API unreachable: {_describe(exc)}") from exc

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[bytes, str]:
        """Body and Content-Type of a successful (2xx) response; KubernetesAPIError otherwise.

        Takes :meth:`exchange`'s keyword arguments.
        """
        answer = await self.exchange(method, path, **kwargs)
        if answer.status >= 300:
            raise answer.error()
        return answer.body, answer.content_type

    async def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Like :meth:`request`, decoded as JSON."""
        data, _ = await self.request(method, path, **kwargs)
        try:
            return loads(data)
        except ValueError as exc:
            raise KubernetesUnavailableError(f"kubernetes API returned invalid JSON for {path}") from exc

    @contextlib.asynccontextmanager
    async def stream(
        self,
        path: str,
        *,
        params: Mapping[str, str],
        caller: Caller | None = None,
        accept: str = "application/json",
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open streaming response (status 200) with no total or read timeout.

        Raises KubernetesAPIError if kube-apiserver refuses the request. Leaving the context
        closes the connection, which is how a watch (or a followed log) is cancelled upstream.
        """
        headers = await self._headers(caller, accept, None)
        try:
            resp = await self._session.get(
                self._conn.server + path,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=None),
                allow_redirects=False,
                **self._request_kwargs(),
            )
        except TimeoutError as exc:
            raise KubernetesTimeoutError(f"kubernetes API did not answer GET {path} in time") from exc
        except aiohttp.ClientError as exc:
            raise KubernetesUnavailableError(f"kubernetes API unreachable: {_describe(exc)}") from exc
        try:
            if resp.status != 200:
                try:
                    data = await asyncio.wait_for(resp.read(), CONNECT_TIMEOUT)
                except (TimeoutError, aiohttp.ClientError):
                    data = b""
                raise _api_error(resp.status, data)
            yield resp
        finally:
            # close(), not release(): a watch that is abandoned mid-stream must drop its connection.
            resp.close()

    async def websocket(
        self,
        path: str,
        *,
        params: Sequence[tuple[str, str]],
        protocols: Sequence[str],
        caller: Caller | None = None,
        max_message: int = MAX_WEBSOCKET_MESSAGE,
    ) -> aiohttp.ClientWebSocketResponse:
        """A WebSocket to kube-apiserver (exec, port-forward) speaking one of ``protocols``.

        ``params`` is a sequence so a key may repeat (``command=sh&command=-c``). The handshake
        must finish within :data:`UPGRADE_TIMEOUT`; after it nothing times out (sessions have
        their own idle timeout). A refused upgrade raises KubernetesAPIError whose code follows
        the HTTP status (aiohttp does not keep the refusal's body, so callers check what they
        can before opening); an unreachable server raises KubernetesUnavailableError.
        """
        headers = await self._headers(caller, "*/*", None)
        try:
            async with asyncio.timeout(UPGRADE_TIMEOUT):
                ws: aiohttp.ClientWebSocketResponse = await self._session.ws_connect(
                    self._conn.server + path,
                    params=list(params),
                    headers=headers,
                    protocols=tuple(protocols),
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                    autoping=True,
                    max_msg_size=max_message,
                    **self._request_kwargs(),
                )
                return ws
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status or 502
            raise KubernetesAPIError(
                status, None, f"kubernetes API refused to open the stream (HTTP {status} {exc.message})"
            ) from exc
        except TimeoutError as exc:
            raise KubernetesTimeoutError(f"kubernetes API did not open the stream {path} in time") from exc
        except aiohttp.ClientError as exc:
            raise KubernetesUnavailableError(f"kubernetes API unreachable: {_describe(exc)}") from exc


async def iter_lines(resp: aiohttp.ClientResponse, max_line: int = MAX_EVENT_BYTES) -> AsyncIterator[bytes]:
    """Newline-delimited lines of a streaming body (aiohttp's readline caps lines at 128 KiB)."""
    buf = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            buf += chunk
            start = 0
            while (end := buf.find(b"\n", start)) >= 0:
                line = bytes(buf[start:end])
                start = end + 1
                if line.strip():
                    yield line
            if start:
                del buf[:start]
            if len(buf) > max_line:
                raise KubernetesUnavailableError(f"kubernetes API sent a watch event over {max_line} bytes")
    except aiohttp.ClientError as exc:
        raise KubernetesUnavailableError(f"kubernetes API connection lost: {_describe(exc)}") from exc
    if buf.strip():
        yield bytes(buf)


def _api_error(status: int, data: bytes) -> KubernetesAPIError:
    parsed: Any = None
    try:
        parsed = loads(data) if data else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("kind") == "Status":
        return KubernetesAPIError(status, parsed)
    return KubernetesAPIError(status, None, data.decode("utf-8", "replace"))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
