"""Direct access to kube-apiserver over the same HTTP stack as the other paths (pyqwest).

Path ``direct`` of the benchmark, and the set-up and writer traffic (namespaces, ConfigMaps,
watch-driving updates). pyqwest (Rust: reqwest/hyper/rustls) is the HTTP client under
connectrpc's clients, so ``direct`` and the Connect paths share a client stack; to
kube-apiserver it speaks HTTP/2 over TLS (ALPN) with the control plane's admin client
certificate (``O=system:masters``), as kubectl would. Compression is off on every path
(``Accept-Encoding: identity``): on loopback it only costs CPU.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pyqwest import Client, FullResponse, HTTPTransport, HTTPVersion

from otterscale.testing import ControlPlane


class KubeError(RuntimeError):
    """kube-apiserver answered with an unexpected status."""


def transport(
    *,
    http_version: HTTPVersion | None = None,
    gzip: bool = False,
    tls_ca_cert: bytes | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
) -> HTTPTransport:
    """A pyqwest transport tuned like the hub's (no compression, no redirects, no OpenTelemetry).

    ``gzip`` lets the transport decompress gzip responses: connectrpc leaves a Connect unary
    response's ``Content-Encoding`` to the HTTP layer.
    """
    return HTTPTransport(
        http_version=http_version,
        connect_timeout=5.0,
        pool_idle_timeout=300.0,
        pool_max_idle_per_host=256,
        enable_gzip=gzip,
        enable_brotli=False,
        enable_zstd=False,
        follow_redirects=False,
        enable_otel=False,
        tls_ca_cert=tls_ca_cert,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


class KubeDirect:
    """An async admin client of one control plane (close with :meth:`aclose`)."""

    def __init__(self, cp: ControlPlane, *, http_version: HTTPVersion | None = None) -> None:
        self.server = cp.server
        self._transport = transport(
            http_version=http_version,
            tls_ca_cert=cp.ca_file.read_bytes(),
            tls_cert=cp.admin_cert.read_bytes(),
            tls_key=cp.admin_key.read_bytes(),
        )
        self.client = Client(self._transport)

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        ok: Iterable[int] = (200, 201),
    ) -> FullResponse:
        hdrs: list[tuple[str, str]] = [("accept", "application/json"), ("accept-encoding", "identity")]
        hdrs += list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        content: bytes | None = None
        if body is not None:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.append(("content-type", content_type))
        url = self.server + path
        if method == "GET":
            resp = await self.client.get(url, hdrs)
        elif method == "POST":
            resp = await self.client.post(url, hdrs, content)
        elif method == "PATCH":
            resp = await self.client.patch(url, hdrs, content)
        elif method == "PUT":
            resp = await self.client.put(url, hdrs, content)
        elif method == "DELETE":
            resp = await self.client.delete(url, hdrs)
        else:
            raise ValueError(method)
        if resp.status not in tuple(ok):
            raise KubeError(f"{method} {path}: HTTP {resp.status}: {resp.content[:300]!r}")
        return resp

    async def ensure_namespace(self, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        await self.request("POST", "/api/v1/namespaces", body, ok=(201, 409))

    async def count(self, path: str) -> int:
        resp = await self.request("GET", path + "?limit=1")
        listed = json.loads(resp.content)
        remaining = int(listed.get("metadata", {}).get("remainingItemCount") or 0)
        return len(listed.get("items", ())) + remaining

    async def create_configmaps(
        self,
        namespace: str,
        names: Iterable[str],
        data: Callable[[str], Mapping[str, str]],
        *,
        concurrency: int = 32,
    ) -> None:
        """Create ConfigMaps with ``data(name)`` (existing ones are kept), ``concurrency`` at a time."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        for name in names:
            queue.put_nowait(name)
        path = f"/api/v1/namespaces/{namespace}/configmaps"

        async def worker() -> None:
            while True:
                try:
                    name = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": name},
                    "data": data(name),
                }
                await self.request("POST", path, body, ok=(201, 409))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
