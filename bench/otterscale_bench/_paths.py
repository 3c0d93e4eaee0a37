"""The three ways to reach a cluster, as callables that do one Get or one List and check it.

- ``direct``: kube-apiserver over HTTPS/HTTP2 with the admin certificate (``https-json``), plus a
  diagnostic variant ``https-json+imp`` that sends the same impersonation headers the agent sends
  (so the API server's own impersonation cost can be told apart from ours).
- ``agent``: the agent's ResourceService, identity headers signed like the hub signs them.
- ``hub``: the hub's ResourceService with an OIDC bearer token.
- ``tunnel`` (diagnostic): the agent reached through the hub's chisel tunnel port, signed like
  the hub signs, without the hub process: ``tunnel - agent`` is the cost of the two chisel
  hops, ``hub - tunnel`` the cost of the hub itself.

Get uses the generated ``ResourceServiceClient`` (connectrpc 0.13) with the Connect protocol and
the binary (``connect-proto``) or JSON (``connect-json``) codec, or gRPC, over h2c (HTTP/2 with
prior knowledge) by default; ``/h1`` variants use HTTP/1.1. Client compression is off unless a
variant says ``+gzip`` (connectrpc's client defaults: gzip requests, accept gzip responses).
Every response is decoded and checked (the object's name), so client decode cost is included
on every path: ``json.loads`` for kube-apiserver's JSON, the protobuf message for Connect/gRPC.

List is a raw Connect unary POST over the same pyqwest stack, so the response body's size on
the wire is known exactly; the body is decoded as a client would (``ListResponse.FromString``
for protobuf, ``json.loads`` for JSON) and its item count checked.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import Identity, sign_identity
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient

from ._kube import KubeDirect, transport

SERVICE = "otterscale.resource.v1.ResourceService"
GET_METHOD = f"/{SERVICE}/Get"
LIST_METHOD = f"/{SERVICE}/List"
WATCH_METHOD = f"/{SERVICE}/Watch"


class CheckError(RuntimeError):
    """A response was not what was asked for (a functional failure of the system under test)."""


@dataclass(frozen=True)
class Variant:
    """One way to make a call: path (direct/agent/hub), protocol and HTTP version."""

    path: str
    protocol: str
    http: str = "h2"
    gzip: bool = False

    @property
    def label(self) -> str:
        extra = ("/h1" if self.http == "h1" else "") + ("+gzip" if self.gzip else "")
        return f"{self.path} {self.protocol}{extra}"


@dataclass
class Endpoints:
    """Where everything is and who calls it."""

    cluster: str
    hub_url: str
    agent_url: str
    tunnel_url: str
    token: str
    identity: Identity
    identity_key: bytes
    kube: KubeDirect

    def auth_headers(self, path: str, method: str) -> dict[str, str]:
        """What a call on ``path`` needs: a bearer token (hub) or signed identity (agent)."""
        if path == "hub":
            return {"authorization": f"Bearer {self.token}"}
        if path in ("agent", "tunnel"):
            return self._signed(method)
        return {}

    def _signed(self, method: str) -> dict[str, str]:
        # Signed once per second and method, as cheaply as the hub does it per call.
        now = int(time.time())
        cached = _SIGNED.get((method, now))
        if cached is None:
            cached = sign_identity(self.identity, cluster=self.cluster, method=method, key=self.identity_key)
            _SIGNED.clear()
            _SIGNED[(method, now)] = cached
        return cached

    def base_url(self, path: str) -> str:
        return {"hub": self.hub_url, "agent": self.agent_url, "tunnel": self.tunnel_url}[path]

    def impersonation(self) -> list[tuple[str, str]]:
        headers = [("impersonate-user", self.identity.subject)]
        headers += [("impersonate-group", g) for g in (*self.identity.groups, "system:authenticated")]
        return headers


_SIGNED: dict[tuple[str, int], dict[str, str]] = {}


class Call:
    """An async callable doing one checked request; :meth:`aclose` releases its connections."""

    async def __call__(self) -> int:
        """Do the request; return the response body size in bytes where known (else 0)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


class DirectGet(Call):
    def __init__(self, ep: Endpoints, namespace: str, name: str, *, impersonate: bool) -> None:
        self._kube = ep.kube
        self._path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        self._name = name
        self._headers = ep.impersonation() if impersonate else []

    async def __call__(self) -> int:
        resp = await self._kube.request("GET", self._path, headers=self._headers)
        obj = json.loads(resp.content)
        if obj["metadata"]["name"] != self._name:
            raise CheckError(f"direct Get returned {obj['metadata']['name']!r}")
        return len(resp.content)


def rpc_client(
    url: str, protocol: str, *, http: str = "h2", gzip: bool = False, read_max_bytes: int | None = None
) -> tuple[ResourceServiceClient, HTTPTransport]:
    """A generated client for ``url`` speaking ``protocol`` (connect-proto, connect-json, grpc)."""
    http_transport = transport(
        http_version=HTTPVersion.HTTP1 if http == "h1" else HTTPVersion.HTTP2, gzip=gzip
    )
    compression: dict[str, Any] = {} if gzip else {"accept_compression": (), "send_compression": None}
    client = ResourceServiceClient(
        url,
        protocol=ProtocolType.GRPC if protocol == "grpc" else ProtocolType.CONNECT,
        codec=google_protobuf_json_codec() if protocol == "connect-json" else google_protobuf_binary_codec(),
        http_client=Client(http_transport),
        read_max_bytes=read_max_bytes,
        **compression,
    )
    return client, http_transport


class RPCGet(Call):
    def __init__(self, ep: Endpoints, variant: Variant, namespace: str, name: str) -> None:
        self._ep = ep
        self._variant = variant
        self._client, self._transport = rpc_client(
            ep.base_url(variant.path), variant.protocol, http=variant.http, gzip=variant.gzip
        )
        self._request = pb.GetRequest(
            cluster=ep.cluster, version="v1", resource="configmaps", namespace=namespace, name=name
        )
        self._name = name

    async def __call__(self) -> int:
        headers = self._ep.auth_headers(self._variant.path, GET_METHOD)
        resource = await self._client.get(self._request, headers=headers)
        got = resource.object.fields["metadata"].struct_value.fields["name"].string_value
        if got != self._name:
            raise CheckError(f"{self._variant.label} Get returned {got!r}")
        return 0

    async def aclose(self) -> None:
        await self._client.close()
        await self._transport.aclose()


def make_get(ep: Endpoints, variant: Variant, namespace: str, name: str) -> Call:
    if variant.path == "direct":
        return DirectGet(ep, namespace, name, impersonate=variant.protocol.endswith("+imp"))
    return RPCGet(ep, variant, namespace, name)


class RawList(Call):
    """List through a raw Connect unary POST (agent/hub) or a GET to kube-apiserver (direct)."""

    def __init__(self, ep: Endpoints, variant: Variant, namespace: str, expected: int) -> None:
        self._ep = ep
        self._variant = variant
        self._expected = expected
        self._namespace = namespace
        self._transport: HTTPTransport | None = None
        if variant.path == "direct":
            return
        self._transport = transport(http_version=HTTPVersion.HTTP2)
        self._client = Client(self._transport)
        self._json = variant.protocol == "connect-json"
        self._url = f"{ep.base_url(variant.path)}/{SERVICE}/List"
        request = pb.ListRequest(cluster=ep.cluster, version="v1", resource="configmaps", namespace=namespace)
        as_json = {"cluster": ep.cluster, "version": "v1", "resource": "configmaps", "namespace": namespace}
        self._body = json.dumps(as_json).encode() if self._json else request.SerializeToString()
        self._headers = {
            "content-type": "application/json" if self._json else "application/proto",
            "connect-protocol-version": "1",
            "accept-encoding": "gzip" if variant.gzip else "identity",
        }

    async def __call__(self) -> int:
        if self._variant.path == "direct":
            resp = await self._ep.kube.request("GET", f"/api/v1/namespaces/{self._namespace}/configmaps")
            self._check(len(json.loads(resp.content)["items"]))
            return len(resp.content)
        headers = {**self._headers, **self._ep.auth_headers(self._variant.path, LIST_METHOD)}
        resp = await self._client.post(self._url, headers, self._body)
        if resp.status != 200:
            raise CheckError(f"{self._variant.label} List: HTTP {resp.status}: {resp.content[:300]!r}")
        content = resp.content
        if resp.headers.get("content-encoding", "identity") == "gzip":
            content = gzip.decompress(content)
        count = (
            len(json.loads(content)["items"])
            if self._json
            else len(pb.ListResponse.FromString(content).items)
        )
        self._check(count)
        return len(resp.content)

    def _check(self, count: int) -> None:
        if count != self._expected:
            raise CheckError(f"{self._variant.label} List returned {count} items, expected {self._expected}")

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()


async def timed(call: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    """(milliseconds, bytes) of one call."""
    started = time.perf_counter()
    size = await call()
    return (time.perf_counter() - started) * 1000.0, size
