"""One HTTP client of the agent to kube-apiserver, alone in a process (issue 14 item 2).

``python -m otterscale_bench._kubeclient_worker --client NAME --kubeconfig F ...``
reads one JSON command per line on stdin and answers each with one JSON line on stdout (logs go
to stderr); EOF on stdin ends it, so it never outlives the benchmark. One process per client so
the CPU each reports is its own: ``time.process_time`` counts every thread of the process
(pyqwest's Tokio runtime as well as the event loop).

The two clients make the same calls with the same headers (``Accept``, ``User-Agent``,
``Accept-Encoding: identity``, the agent's own ``Authorization`` from its
:class:`~otterscale.agent.KubeConnection`, ``Impersonate-User`` and one ``Impersonate-Group``
per group plus ``system:authenticated``) and the same error mapping:

- ``aiohttp``: what ships. The agent's own ``KubeClient`` (``otterscale.agent._kube``), built by
  its own ``KubeClient.open`` from the connection its ``load_connection`` reads out of the
  kubeconfig, in a process tuned as the agent's is (``tune_tls_reads``, start-up's objects frozen; asyncio's
  event loop, the agent's ``LOOP``). HTTP/1.1: one TCP+TLS connection per request in flight and
  per Watch.
- ``pyqwest``: :class:`PyqwestKubeClient`, the same ``request``/``stream`` surface over pyqwest
  (reqwest, hyper, rustls in Rust) in the same tuned process, over HTTP/2: every call a stream,
  up to kube-apiserver's 100 concurrent streams per connection (then pyqwest opens another).
  TLS material comes from the files the kubeconfig names (pyqwest takes PEM bytes, not an
  ``ssl.SSLContext``); everything else from the same ``KubeConnection``. ``pyqwest-h1`` is the
  same over HTTP/1.1 (what HTTP/2 changes); ``pyqwest-alpn`` leaves the version to ALPN (see
  :data:`PYQWEST_VERSIONS`; not in the scenario).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyqwest

from otterscale.agent import KubeConnection, load_connection
from otterscale.agent._cli import tune_tls_reads
from otterscale.agent._errors import KubernetesTimeoutError, KubernetesUnavailableError
from otterscale.agent._kube import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    MAX_EVENT_BYTES,
    Answer,
    KubeClient,
    impersonation_headers,
    iter_lines,
    loads,
)
from otterscale.common import Identity

logger = logging.getLogger("otterscale_bench.kubeclient")

CLIENTS = ("aiohttp", "pyqwest", "pyqwest-h1")
#: pyqwest's HTTP version by client name. ``pyqwest`` sets HTTP/2 (TLS still offers only ``h2``
#: by ALPN): left to ALPN (``pyqwest-alpn``), a burst of requests that needs a new connection can
#: fail with "client error (Canceled): ALPN" (hyper-util's pool cancels the connects it races
#: once one of them turns out to be HTTP/2), which the benchmark saw when a 100-Watch batch
#: opened the 4th connection (kube-apiserver allows 100 streams per connection).
#: ``pyqwest-h1`` (HTTP/1.1) tells what is HTTP/2's share of the difference.
PYQWEST_VERSIONS = {
    "pyqwest": pyqwest.HTTPVersion.HTTP2,
    "pyqwest-h1": pyqwest.HTTPVersion.HTTP1,
    "pyqwest-alpn": None,
}
USER_AGENT = "otterscale-agent"
MIB = 1024 * 1024
#: What pyqwest raises when kube-apiserver cannot be reached or the exchange breaks (the agent's
#: KubernetesUnavailableError; a TimeoutError is KubernetesTimeoutError).
TRANSPORT_ERRORS = (ConnectionError, pyqwest.ReadError, pyqwest.WriteError, pyqwest.RemoteProtocolError)


# --------------------------------------------------------------------------------------------------
# The client that would replace aiohttp


class PyqwestKubeClient:
    """``KubeClient``'s ``request`` and ``stream`` over pyqwest (HTTP/2 when the server offers it)."""

    def __init__(self, connection: KubeConnection, transport: pyqwest.HTTPTransport) -> None:
        self._conn = connection
        self._transport = transport
        self._client = pyqwest.Client(transport)

    @classmethod
    def open(
        cls,
        connection: KubeConnection,
        *,
        ca: bytes | None,
        cert: bytes | None,
        key: bytes | None,
        http_version: pyqwest.HTTPVersion | None = None,
    ) -> PyqwestKubeClient:
        transport = pyqwest.HTTPTransport(
            http_version=http_version,
            tls_ca_cert=ca,
            tls_cert=cert,
            tls_key=key,
            connect_timeout=CONNECT_TIMEOUT,
            pool_idle_timeout=60.0,  # aiohttp's keepalive_timeout in the agent
            tcp_keepalive_interval=10.0,
            enable_gzip=False,  # the agent asks for identity; loopback bandwidth is cheaper than CPU
            enable_brotli=False,
            enable_zstd=False,
            follow_redirects=False,
            enable_otel=False,
        )
        return cls(connection, transport)

    async def close(self) -> None:
        await self._transport.aclose()

    async def _headers(self, caller: Identity | None, accept: str) -> list[tuple[str, str]]:
        headers = [("accept", accept), ("user-agent", USER_AGENT), ("accept-encoding", "identity")]
        authorization = await self._conn.authorization()
        if authorization:
            headers.append(("authorization", authorization))
        if caller is not None:
            headers += impersonation_headers(caller)
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        caller: Identity | None = None,
        accept: str = "application/json",
        time_limit: float | None = None,
    ) -> tuple[bytes, str]:
        """Body and Content-Type of a 2xx answer; the agent's KubernetesAPIError otherwise."""
        headers = await self._headers(caller, accept)
        try:
            async with asyncio.timeout(time_limit if time_limit is not None else DEFAULT_TIMEOUT):
                resp = await self._client.execute(
                    method, self._conn.server + path, headers, params=_query(params)
                )
        except TimeoutError as exc:
            raise KubernetesTimeoutError(f"kubernetes API did not answer {method} {path} in time") from exc
        except TRANSPORT_ERRORS as exc:
            raise KubernetesUnavailableError(f"kubernetes API unreachable: {_describe(exc)}") from exc
        answer = Answer(
            resp.status, resp.content, resp.headers.get("content-type", ""), resp.headers.get("location", "")
        )
        if answer.status >= 300:
            raise answer.error()
        return answer.body, answer.content_type

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, *, params: Mapping[str, str], caller: Identity | None = None
    ) -> AsyncIterator[pyqwest.Response]:
        """An open 200 response with no total or read timeout; leaving resets the stream."""
        headers = await self._headers(caller, "application/json")
        try:
            async with self._client.stream(
                "GET", self._conn.server + path, headers, params=_query(params)
            ) as resp:
                if resp.status != 200:
                    chunks = bytearray()
                    with contextlib.suppress(TimeoutError, pyqwest.ReadError):
                        async with asyncio.timeout(CONNECT_TIMEOUT):
                            async for chunk in resp.content:
                                chunks += chunk
                    raise Answer(resp.status, bytes(chunks), resp.headers.get("content-type", "")).error()
                yield resp
        except TRANSPORT_ERRORS as exc:
            raise KubernetesUnavailableError(f"kubernetes API unreachable: {_describe(exc)}") from exc


def _query(params: Mapping[str, str] | None) -> dict[str, str | None]:
    return dict(params or {})


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def body_lines(chunks: AsyncIterator[bytes | memoryview | bytearray]) -> AsyncIterator[bytes]:
    """The non-empty lines of a streamed body (watch events), at most ``MAX_EVENT_BYTES`` each."""
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        *lines, rest = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield bytes(line)
        pending = rest
        if len(pending) > MAX_EVENT_BYTES:
            raise KubernetesUnavailableError("kubernetes API sent a watch event over the limit")
    if pending.strip():
        yield bytes(pending)


# --------------------------------------------------------------------------------------------------
# The calls the benchmark makes, the same for both clients


class Calls:
    """What the benchmark does through either client: a Get (body read whole) and a Watch (its
    lines); aiohttp's streamed body is split by the agent's own ``iter_lines``."""

    def __init__(self, client: KubeClient | PyqwestKubeClient, caller: Identity) -> None:
        self._client = client
        self._caller = caller
        self.http_version = "?"

    async def get(self, path: str) -> bytes:
        body, _ = await self._client.request("GET", path, caller=self._caller)
        return body

    @contextlib.asynccontextmanager
    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self._client.stream(path, params=params, caller=self._caller) as resp:
            if isinstance(resp, pyqwest.Response):
                self.http_version = _version(resp.http_version)
                yield body_lines(resp.content)
            else:
                self.http_version = f"HTTP/{resp.version.major}.{resp.version.minor}" if resp.version else "?"
                yield iter_lines(resp)

    async def close(self) -> None:
        await self._client.close()


def _version(version: pyqwest.HTTPVersion) -> str:
    for name in ("HTTP1", "HTTP2", "HTTP3"):
        if version == getattr(pyqwest.HTTPVersion, name):
            return {"HTTP1": "HTTP/1.1", "HTTP2": "HTTP/2", "HTTP3": "HTTP/3"}[name]
    return str(version)


# --------------------------------------------------------------------------------------------------
# Memory of this process


def rss_mib() -> float:
    return _status("VmRSS:")


def peak_rss_mib() -> float:
    """The high-water mark since :func:`reset_peak` (or since start)."""
    return _status("VmHWM:")


def reset_peak() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# --------------------------------------------------------------------------------------------------
# The commands


@dataclass
class _Watches:
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    established: int = 0
    target: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    first_event_ms: list[float] = field(default_factory=list)
    #: (the write's stamp in ns, receive time in ns) of each MODIFIED event
    received: list[tuple[int, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    closing: bool = False
    ended: int = 0
    mark_cpu: float = 0.0
    mark_wall: float = 0.0

    def settle(self) -> None:
        self.established += 1
        if self.established >= self.target:
            self.ready.set()


class Worker:
    """Runs the commands of the benchmark on one client."""

    def __init__(self, name: str, calls: Calls) -> None:
        self.name = name
        self.calls = calls
        self.watches = _Watches()

    async def get(self, path: str, n: int) -> dict[str, Any]:
        """``n`` sequential Gets: latency of each, CPU of all."""
        samples: list[float] = []
        cpu, wall = time.process_time(), time.perf_counter()
        body = b""
        for _ in range(n):
            started = time.perf_counter()
            body = await self.calls.get(path)
            samples.append((time.perf_counter() - started) * 1000.0)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        name = loads(body)["metadata"]["name"] if body else None
        return {"ms": samples, "cpu_seconds": cpu, "wall_seconds": wall, "name": name}

    async def get_concurrent(self, path: str, n: int, concurrency: int) -> dict[str, Any]:
        """``n`` Gets, ``concurrency`` at a time (as the agent serves concurrent callers)."""
        left = n
        samples: list[float] = []

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                started = time.perf_counter()
                await self.calls.get(path)
                samples.append((time.perf_counter() - started) * 1000.0)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return {
            "ms": samples,
            "cpu_seconds": time.process_time() - cpu,
            "wall_seconds": time.perf_counter() - wall,
        }

    async def listing(self, path: str) -> dict[str, Any]:
        """One List, timed until its body is read; item count decoded outside the measurement."""
        reset_peak()
        cpu, started = time.process_time(), time.perf_counter()
        body = await self.calls.get(path)
        ms = (time.perf_counter() - started) * 1000.0
        cpu = time.process_time() - cpu
        peak = peak_rss_mib()
        return {
            "ms": ms,
            "cpu_seconds": cpu,
            "bytes": len(body),
            "items": len(loads(body)["items"]),
            "peak_rss_mib": peak,
        }

    async def watch_open(self, path: str, names: list[str], batch: int) -> dict[str, Any]:
        """One Watch per name (field selector), in batches that must each be established (their
        object's ADDED event arrived) before the next starts."""
        w = self.watches = _Watches()
        rest = rss_mib()
        cpu, started = time.process_time(), time.perf_counter()
        for first in range(0, len(names), batch):
            chunk = names[first : first + batch]
            w.target = first + len(chunk)
            w.ready.clear()
            w.tasks += [
                asyncio.create_task(self._watch(path, name), name=f"bench-kubeclient-watch-{name}")
                for name in chunk
            ]
            try:
                await asyncio.wait_for(w.ready.wait(), 120)
            except TimeoutError:
                w.failures.append(f"batch at {first} not established within 120 s")
                break
        return {
            "requested": len(names),
            "open": len(w.tasks) - w.ended,
            "open_seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu,
            "first_event_ms": w.first_event_ms,
            "rss_mib_rest": rest,
            "rss_mib_open": rss_mib(),
            "http_version": self.calls.http_version,
            "failures": w.failures[:5],
            "failure_count": len(w.failures),
        }

    async def _watch(self, path: str, name: str) -> None:
        w = self.watches
        params = {"watch": "1", "allowWatchBookmarks": "true", "fieldSelector": f"metadata.name={name}"}
        started = time.perf_counter()
        established = False
        try:
            async with self.calls.watch(path, params) as lines:
                async for line in lines:
                    now = time.time_ns()
                    event = loads(line)
                    kind = event.get("type")
                    if kind == "ADDED" and not established:
                        established = True
                        w.first_event_ms.append((time.perf_counter() - started) * 1000.0)
                        w.settle()
                    elif kind == "MODIFIED":
                        stamp = str((event["object"].get("data") or {}).get("ts", ""))
                        if stamp.isdigit():
                            w.received.append((int(stamp), now))
                    elif kind == "ERROR":
                        w.failures.append(f"{name}: ERROR event {line[:200]!r}")
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not w.closing:
                w.failures.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        finally:
            w.ended += 1
            if not established:
                w.settle()  # a failed Watch must not hold the ramp up

    async def watch_mark(self) -> dict[str, Any]:
        """Start a window: CPU, wall clock and peak RSS count from here."""
        w = self.watches
        w.received.clear()
        reset_peak()
        w.mark_cpu, w.mark_wall = time.process_time(), time.perf_counter()
        return {"rss_mib": rss_mib()}

    async def watch_sample(self) -> dict[str, Any]:
        """CPU and wall clock since the mark, RSS now and at its peak since the mark."""
        w = self.watches
        return {
            "cpu_seconds": time.process_time() - w.mark_cpu,
            "wall_seconds": time.perf_counter() - w.mark_wall,
            "rss_mib": rss_mib(),
            "peak_rss_mib": peak_rss_mib(),
            "ended": w.ended,
            "failure_count": len(w.failures),
        }

    async def watch_deliveries(self, expected: list[int], wait_seconds: float) -> dict[str, Any]:
        """Delivery latency (receive - write stamp) of the ``expected`` writes, waiting up to
        ``wait_seconds`` for the last of them."""
        w = self.watches
        wanted: set[int] = set(expected)
        deadline = time.monotonic() + wait_seconds
        while sum(1 for stamp, _ in w.received if stamp in wanted) < len(wanted):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        delivered = [(recv - stamp) / 1e6 for stamp, recv in w.received if stamp in wanted]
        return {"delivery_ms": delivered, "missing": len(wanted) - len(delivered)}

    async def watch_close(self) -> dict[str, Any]:
        w = self.watches
        w.closing = True
        for task in w.tasks:
            task.cancel()
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*w.tasks, return_exceptions=True), 60)
        return {
            "close_seconds": time.perf_counter() - started,
            "failures": w.failures[:5],
            "failure_count": len(w.failures),
            "rss_mib": rss_mib(),
        }

    async def rss(self) -> dict[str, Any]:
        return {"rss_mib": rss_mib(), "peak_rss_mib": peak_rss_mib()}


async def _open(args: argparse.Namespace) -> Calls:
    connection = await load_connection(args.kubeconfig, {})
    caller = Identity(args.subject, tuple(args.group))
    if args.client == "aiohttp":
        return Calls(await KubeClient.open(connection, user_agent=USER_AGENT), caller)
    pem = {
        name: Path(value).read_bytes() if value else None
        for name, value in (("ca", args.ca), ("cert", args.cert), ("key", args.key))
    }
    client = PyqwestKubeClient.open(connection, **pem, http_version=PYQWEST_VERSIONS[args.client])
    return Calls(client, caller)


async def _serve(args: argparse.Namespace) -> None:
    # The agent's process tuning: asyncio's TLS read buffer at 64 KiB per connection (aiohttp's
    # Watches each hold one), then what start-up made frozen, as otterscale.common's host does.
    tune_tls_reads()
    calls = await _open(args)
    gc.freeze()
    worker = Worker(args.client, calls)
    commands: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
        "get": worker.get,
        "get_concurrent": worker.get_concurrent,
        "list": worker.listing,
        "watch_open": worker.watch_open,
        "watch_mark": worker.watch_mark,
        "watch_sample": worker.watch_sample,
        "watch_deliveries": worker.watch_deliveries,
        "watch_close": worker.watch_close,
        "rss": worker.rss,
    }
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * MIB)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _answer({"ready": True, "pid": os.getpid()})
    try:
        while line := await reader.readline():
            command = json.loads(line)
            op = command.pop("op")
            if op == "exit":
                break
            try:
                _answer({"ok": await commands[op](**command)})
            except Exception as exc:
                logger.exception("%s failed", op)
                _answer({"error": f"{type(exc).__name__}: {exc}"[:500]})
    finally:
        if worker.watches.tasks:
            await worker.watch_close()
        await calls.close()


def _answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m otterscale_bench._kubeclient_worker")
    parser.add_argument("--client", choices=["aiohttp", *PYQWEST_VERSIONS], required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--ca", help="PEM CA file of kube-apiserver (pyqwest)")
    parser.add_argument("--cert", help="PEM client certificate (pyqwest)")
    parser.add_argument("--key", help="PEM client key (pyqwest)")
    parser.add_argument("--subject", required=True, help="the user every call impersonates")
    parser.add_argument("--group", action="append", default=[], help="a group it impersonates")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
