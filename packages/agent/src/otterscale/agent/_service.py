"""ResourceService: its RPCs, executed in the cluster as the verified caller.

Each handler validates its request, resolves the resource through the discovery cache (no
round trip per call), builds the REST path, calls kube-apiserver through :class:`KubeClient`
impersonating the caller (Discovery and Schema use the agent's own credentials), and converts
the JSON answer to protobuf. Handlers raise only the agent's own errors; :class:`ErrorBoundary`
turns them into Connect errors in one place, and no exception text other than those reaches a
client.

Behaviour chosen where api.md leaves room (also in the README):

- Apply's field manager defaults to ``"otterscale"``. Create sets none, so Kubernetes names the
  manager after the agent's User-Agent (``otterscale-agent``, operation Update); applying a
  different value to a field Create set is then a conflict unless ``force`` (as with kubectl).
- Create/Apply take the namespace from the request, else from the manifest; a namespaced
  resource with neither is invalid_argument. Cluster-scoped resources ignore the namespace.
- List, Watch and Describe objects lose ``managedFields`` and the last-applied annotation; Get
  returns the whole object. List items get ``apiVersion``/``kind`` filled in (kube-apiserver
  omits them for built-in types), as client-go's unstructured lists do.
- Describe: the object, and its events found and ordered as ``_events`` explains; not being
  allowed to list events is reported in ``events_error``, never a failed call.
- Watch: a too-old resourceVersion is an ERROR event carrying the 410 Status (whether
  kube-apiserver reports it in the stream or as the HTTP status), after which the stream ends OK.
  Any other refusal before the stream starts is an ordinary error. When kube-apiserver ends the
  watch (its own timeout, a restart) the stream ends with unavailable; the client resumes from
  the last resource_version it saw. When the agent shuts down, open watches end with unavailable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf import empty_pb2, struct_pb2  # type: ignore[import-untyped]  # no stubs for protobuf 7

from otterscale.resource.v1 import resource_pb2 as pb

from ._auth import current_identity, procedure
from ._codecs import SerializedMessage
from ._discovery import APIResourceInfo, DiscoveryCache
from ._errors import (
    InvalidRequestError,
    KubernetesAPIError,
    KubernetesUnavailableError,
    ShuttingDownError,
    UnknownClusterError,
    WatchClosedError,
    to_connect_error,
)
from ._events import DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT, list_object_events
from ._kube import KubeClient, iter_lines, loads
from ._manifest import parse_manifest
from ._objects import clean_object, collection_path, object_path, with_type_meta
from ._schema import SchemaCache
from ._structs import field_bytes, struct_bytes, to_struct

logger = logging.getLogger(__name__)

#: Longest label or field selector passed on; kube-apiserver refuses a request line or header
#: section much over this with a bare HTTP 414/431 (a 1 MiB selector in the fuzz tests).
MAX_SELECTOR_LENGTH = 64 * 1024
#: Manifests larger than this are parsed in a worker thread: a 3 MiB YAML document with many
#: keys takes seconds of CPU, and the agent must keep answering other calls meanwhile.
PARSE_IN_THREAD_BYTES = 64 * 1024

__all__ = ["DEFAULT_FIELD_MANAGER", "ErrorBoundary", "ResourceServiceImpl"]

#: Field manager of Apply when the request names none.
DEFAULT_FIELD_MANAGER = "otterscale"

_ITEMS_FIELD = pb.ListResponse.DESCRIPTOR.fields_by_name["items"].number
_OBJECT_FIELD = pb.Resource.DESCRIPTOR.fields_by_name["object"].number

_EVENT_TYPES = {
    "ADDED": pb.WatchEvent.TYPE_ADDED,
    "MODIFIED": pb.WatchEvent.TYPE_MODIFIED,
    "DELETED": pb.WatchEvent.TYPE_DELETED,
    "BOOKMARK": pb.WatchEvent.TYPE_BOOKMARK,
    "ERROR": pb.WatchEvent.TYPE_ERROR,
}

_PROPAGATION = {
    pb.PROPAGATION_POLICY_ORPHAN: "Orphan",
    pb.PROPAGATION_POLICY_BACKGROUND: "Background",
    pb.PROPAGATION_POLICY_FOREGROUND: "Foreground",
}


def _resource_bytes(obj: dict[str, Any]) -> bytes:
    return field_bytes(_OBJECT_FIELD, (struct_bytes(obj),))


def resource_message(obj: dict[str, Any]) -> pb.Resource:
    """A Resource wrapping ``obj``, built from wire bytes (see ``_structs``)."""
    resource: pb.Resource = pb.Resource.FromString(_resource_bytes(obj))
    return resource


def _time_limit(ctx: RequestContext[Any, Any]) -> float | None:
    remaining = ctx.timeout_ms
    return None if remaining is None else max(remaining / 1000.0, 0.001)


def _require(value: str, field: str) -> str:
    if not value:
        raise InvalidRequestError(f"{field} is required")
    return value


class ResourceServiceImpl:
    """The agent's ResourceService (the generated ``ResourceService`` protocol)."""

    def __init__(
        self,
        *,
        cluster: str,
        client: KubeClient,
        discovery: DiscoveryCache,
        schemas: SchemaCache,
    ) -> None:
        self._cluster = cluster
        self._client = client
        self._discovery = discovery
        self._schemas = schemas
        self._watches: set[aiohttp.ClientResponse] = set()
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """End every open Watch (with unavailable) and refuse new ones: the agent is stopping."""
        self._closing = True
        for resp in list(self._watches):
            resp.close()

    # --- helpers -----------------------------------------------------------------------------

    def _check_cluster(self, cluster: str) -> None:
        # The hub routes by cluster and signs for it; an empty field is accepted for direct use.
        if cluster and cluster != self._cluster:
            raise UnknownClusterError(f'this agent serves cluster "{self._cluster}", not "{cluster}"')

    async def _resolve(self, cluster: str, group: str, version: str, resource: str) -> APIResourceInfo:
        self._check_cluster(cluster)
        _require(version, "version")
        _require(resource, "resource")
        return await self._discovery.lookup(group, version, resource)

    # --- RPCs --------------------------------------------------------------------------------

    async def discovery(
        self, request: pb.DiscoveryRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.DiscoveryResponse:
        self._check_cluster(request.cluster)
        resources = await self._discovery.resources()
        return pb.DiscoveryResponse(
            api_resources=[
                pb.APIResource(
                    group=r.group,
                    version=r.version,
                    resource=r.resource,
                    kind=r.kind,
                    namespaced=r.namespaced,
                    verbs=r.verbs,
                    short_names=r.short_names,
                )
                for r in resources
            ]
        )

    async def schema(self, request: pb.SchemaRequest, ctx: RequestContext[Any, Any], /) -> struct_pb2.Struct:
        self._check_cluster(request.cluster)
        _require(request.version, "version")
        _require(request.kind, "kind")
        encoded = await self._schemas.schema(request.group, request.version, request.kind)
        schema: struct_pb2.Struct = struct_pb2.Struct.FromString(encoded)
        return schema

    async def list(
        self, request: pb.ListRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.ListResponse | SerializedMessage:
        """A ListResponse, sent as built (wire bytes; the codecs in _codecs handle it)."""
        info = await self._resolve(request.cluster, request.group, request.version, request.resource)
        if request.limit < 0:
            raise InvalidRequestError("limit must not be negative")
        params: dict[str, str] = {}
        params.update(_selectors(request))
        if request.limit:
            params["limit"] = str(request.limit)
        token = getattr(request, "continue")
        if token:
            params["continue"] = token
        data, _ = await self._client.request(
            "GET",
            collection_path(info, request.namespace),
            params=params,
            caller=current_identity(),
            time_limit=_time_limit(ctx),
        )
        try:
            listed = loads(data)
        except ValueError as exc:
            raise KubernetesUnavailableError("kubernetes API returned an invalid list") from exc
        metadata = listed.get("metadata") or {}
        header = pb.ListResponse(
            resource_version=str(metadata.get("resourceVersion") or ""),
            remaining_item_count=int(metadata.get("remainingItemCount") or 0),
        )
        setattr(header, "continue", str(metadata.get("continue") or ""))
        items = listed.get("items") or ()
        # Fields 1-3, then the items (4), in wire format: the message the agent used to build,
        # without parsing megabytes into objects only to serialize them again (see _codecs).
        return SerializedMessage(
            header.SerializeToString()
            + field_bytes(
                _ITEMS_FIELD, (_resource_bytes(with_type_meta(clean_object(item), info)) for item in items)
            ),
            pb.ListResponse,
        )

    async def get(self, request: pb.GetRequest, ctx: RequestContext[Any, Any], /) -> pb.Resource:
        info = await self._resolve(request.cluster, request.group, request.version, request.resource)
        obj = await self._client.request_json(
            "GET",
            object_path(info, request.namespace, request.name),
            caller=current_identity(),
            time_limit=_time_limit(ctx),
        )
        return resource_message(with_type_meta(obj, info))

    async def describe(
        self, request: pb.DescribeRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.DescribeResponse:
        limit = DEFAULT_EVENTS_LIMIT
        if request.HasField("events_limit"):
            limit = request.events_limit
            if not 1 <= limit <= MAX_EVENTS_LIMIT:
                raise InvalidRequestError(
                    f"events_limit must be between 1 and {MAX_EVENTS_LIMIT}, not {limit}"
                )
        _require(request.name, "name")
        info = await self._resolve(request.cluster, request.group, request.version, request.resource)
        caller = current_identity()
        obj = await self._client.request_json(
            "GET",
            object_path(info, request.namespace, request.name),
            caller=caller,
            time_limit=_time_limit(ctx),
        )
        found = await list_object_events(
            self._client, info, obj, caller=caller, limit=limit, time_limit=lambda: _time_limit(ctx)
        )
        response = pb.DescribeResponse(
            resource=resource_message(with_type_meta(clean_object(obj), info)), events_error=found.error
        )
        response.events.extend(resource_message(event) for event in found.events)
        return response

    async def create(self, request: pb.CreateRequest, ctx: RequestContext[Any, Any], /) -> pb.Resource:
        info = await self._resolve(request.cluster, request.group, request.version, request.resource)
        manifest = await _parse(request.manifest)
        namespace = self._namespace_for(info, request.namespace, manifest)
        params = {"dryRun": "All"} if request.dry_run else {}
        obj = await self._client.request_json(
            "POST",
            collection_path(info, namespace),
            params=params,
            body=json.dumps(manifest).encode(),
            content_type="application/json",
            caller=current_identity(),
            time_limit=_time_limit(ctx),
        )
        return resource_message(with_type_meta(obj, info))

    async def apply(self, request: pb.ApplyRequest, ctx: RequestContext[Any, Any], /) -> pb.Resource:
        info = await self._resolve(request.cluster, request.group, request.version, request.resource)
        manifest = await _parse(request.manifest)
        metadata = manifest.setdefault("metadata", {})
        name = request.name or str(metadata.get("name") or "")
        if not name:
            raise InvalidRequestError("name is required (in the request or the manifest's metadata.name)")
        metadata.setdefault("name", name)
        namespace = self._namespace_for(info, request.namespace, manifest)
        params = {"fieldManager": request.field_manager or DEFAULT_FIELD_MANAGER}
        if request.force:
            params["force"] = "true"
        if request.dry_run:
            params["dryRun"] = "All"
        obj = await self._client.request_json(
            "PATCH",
            object_path(info, namespace, name),
            params=params,
            body=json.dumps(manifest).encode(),  # JSON is YAML: apply-patch+yaml accepts it
            content_type="application/apply-patch+yaml",
            caller=current_identity(),
            time_limit=_time_limit(ctx),
        )
        return resource_message(with_type_meta(obj, info))

    async def delete(self, request: pb.DeleteRequest, ctx: RequestContext[Any, Any], /) -> empty_pb2.Empty:
        info = await self._resolve(request.cluster, request.group, request.version, request.resource)
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if request.HasField("grace_period_seconds"):
            if request.grace_period_seconds < 0:
                raise InvalidRequestError("grace_period_seconds must not be negative")
            options["gracePeriodSeconds"] = request.grace_period_seconds
        if request.propagation_policy:
            policy = _PROPAGATION.get(request.propagation_policy)
            if policy is None:
                raise InvalidRequestError(f"unknown propagation_policy {request.propagation_policy}")
            options["propagationPolicy"] = policy
        if request.dry_run:
            options["dryRun"] = ["All"]
        await self._client.request(
            "DELETE",
            object_path(info, request.namespace, request.name),
            body=json.dumps(options).encode(),
            content_type="application/json",
            caller=current_identity(),
            time_limit=_time_limit(ctx),
        )
        return empty_pb2.Empty()

    async def watch(
        self, request: pb.WatchRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.WatchEvent]:
        if self._closing:
            raise ShuttingDownError("the agent is shutting down")
        caller = current_identity()
        info = await self._resolve(request.cluster, request.group, request.version, request.resource)
        params = {"watch": "1", "allowWatchBookmarks": "true"}
        if request.resource_version:
            params["resourceVersion"] = request.resource_version
        params.update(_selectors(request))
        if request.send_initial_events:
            params["sendInitialEvents"] = "true"
            params["resourceVersionMatch"] = "NotOlderThan"
        last_rv = request.resource_version
        opened = False
        try:
            async with self._client.stream(
                collection_path(info, request.namespace), params=params, caller=caller
            ) as resp:
                opened = True
                self._watches.add(resp)
                try:
                    async for line in iter_lines(resp):
                        event = _watch_event(line, info)
                        if event.resource_version:
                            last_rv = event.resource_version
                        yield event
                        if event.type == pb.WatchEvent.TYPE_ERROR:
                            return
                finally:
                    self._watches.discard(resp)
        except KubernetesAPIError as exc:
            if _bad_watch_resource_version(exc):
                # kube-apiserver answers a watch from an unparseable resourceVersion with 500
                # InternalError (a List gets 400): it is the request that is wrong.
                raise InvalidRequestError(exc.message) from exc
            if exc.http_status != 410 or self._closing:
                raise
            yield pb.WatchEvent(type=pb.WatchEvent.TYPE_ERROR, status=to_struct(exc.status or _gone(exc)))
            return
        except (KubernetesUnavailableError, aiohttp.ClientError) as exc:
            if self._closing:
                raise ShuttingDownError("the agent is shutting down; resume the watch elsewhere") from exc
            if not opened:
                raise
            # The stream was cut (kube-apiserver restarted or the connection broke): what the
            # client needs is where to resume, not aiohttp's description of the broken body.
            logger.info("kubernetes watch of %s cut: %s", info.resource, exc)
            raise WatchClosedError(
                "the kubernetes watch was cut; resume from resourceVersion " + (last_rv or '"" (most recent)')
            ) from exc
        if self._closing:
            raise ShuttingDownError("the agent is shutting down; resume the watch elsewhere")
        raise WatchClosedError(
            "the kubernetes watch ended; resume from resourceVersion " + (last_rv or '"" (most recent)')
        )

    def _namespace_for(self, info: APIResourceInfo, requested: str, manifest: dict[str, Any]) -> str:
        if not info.namespaced:
            return ""
        namespace = requested or str((manifest.get("metadata") or {}).get("namespace") or "")
        if not namespace:
            raise InvalidRequestError(
                f'namespace is required for namespaced resource "{info.resource}" '
                "(in the request or the manifest's metadata.namespace)"
            )
        return namespace


async def _parse(raw: bytes) -> dict[str, Any]:
    if len(raw) <= PARSE_IN_THREAD_BYTES:
        return parse_manifest(raw)
    return await asyncio.to_thread(parse_manifest, raw)


def _bad_watch_resource_version(exc: KubernetesAPIError) -> bool:
    return exc.http_status == 500 and exc.message.startswith("resourceVersion: Invalid value")


def _selectors(request: pb.ListRequest | pb.WatchRequest) -> dict[str, str]:
    """The query parameters of the request's selectors, refused when longer than any sane one."""
    params: dict[str, str] = {}
    for field, param in (("label_selector", "labelSelector"), ("field_selector", "fieldSelector")):
        value: str = getattr(request, field)
        if len(value) > MAX_SELECTOR_LENGTH:
            raise InvalidRequestError(
                f"{field} is {len(value)} characters; the limit is {MAX_SELECTOR_LENGTH}"
            )
        if value:
            params[param] = value
    return params


def _gone(exc: KubernetesAPIError) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "Gone",
        "code": 410,
        "message": exc.message,
    }


def _watch_event(line: bytes, info: APIResourceInfo) -> pb.WatchEvent:
    try:
        raw = loads(line)
        kind = _EVENT_TYPES[raw["type"]]
        obj = raw["object"]
        if not isinstance(obj, dict):
            raise TypeError("object is not a JSON object")
    except (ValueError, KeyError, TypeError) as exc:
        raise KubernetesUnavailableError("kubernetes API sent a malformed watch event") from exc
    if kind == pb.WatchEvent.TYPE_ERROR:
        return pb.WatchEvent(type=kind, status=to_struct(obj))
    metadata = obj.get("metadata")
    rv = str(metadata.get("resourceVersion") or "") if isinstance(metadata, dict) else ""
    if kind != pb.WatchEvent.TYPE_BOOKMARK:
        with_type_meta(clean_object(obj), info)
    event = pb.WatchEvent(type=kind, resource_version=rv)
    event.resource.MergeFromString(_resource_bytes(obj))
    return event


class ErrorBoundary:
    """The service's error boundary (connectrpc interceptor of every call shape).

    Every exception leaving a handler is translated once by :func:`to_connect_error`; failures
    are logged with the procedure, caller and code (never the request contents).
    """

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        started = time.perf_counter()
        try:
            response = await call_next(request, ctx)
        except Exception as exc:
            error = to_connect_error(exc)
            _log_failure(ctx, error, started)
            if error is exc:
                raise
            raise error from exc
        logger.debug("%s ok in %.1f ms", procedure(ctx), (time.perf_counter() - started) * 1000)
        return response

    async def intercept_server_stream(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        stream = call_next(request, ctx)
        try:
            async for message in stream:
                yield message
        except Exception as exc:
            error = to_connect_error(exc)
            _log_failure(ctx, error, started)
            if error is exc:
                raise
            raise error from exc
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[Any], RequestContext[Any, Any]], Awaitable[Any]],
        request: AsyncIterator[Any],
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        return await self.intercept_unary(call_next, request, ctx)

    async def intercept_bidi_stream(
        self,
        call_next: Callable[[AsyncIterator[Any], RequestContext[Any, Any]], AsyncIterator[Any]],
        request: AsyncIterator[Any],
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[Any]:
        async for message in self.intercept_server_stream(call_next, request, ctx):
            yield message


def _log_failure(ctx: RequestContext[Any, Any], error: ConnectError, started: float) -> None:
    elapsed = (time.perf_counter() - started) * 1000
    logger.info("%s failed after %.1f ms: %s: %s", procedure(ctx), elapsed, error.code.value, error.message)
