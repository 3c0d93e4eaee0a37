"""One kind's schema from the cluster's OpenAPI v3 documents, with every ``$ref`` inlined.

``/openapi/v3`` lists one document per group-version under a URL carrying a content hash
(``/openapi/v3/apis/apps/v1?hash=...``). Documents are cached by that URL, so a cached document
is valid exactly until the hash changes. kube-apiserver answers a hashed URL whose document has
changed since with HTTP 301 to the new hash, and one whose group-version is gone with 404. So
every call revalidates its cached document with a conditional GET (``If-None-Match`` with the
hash: 304, no body, when unchanged); on a 301 it fetches the document the redirect names (once;
kube-apiserver's index lags up to a second behind its documents, so re-reading the index would
often still give the old URL), on a 404 it re-reads the index and tries once more. A changed
CRD's schema is therefore served as soon as kube-apiserver publishes it: never a stale one, never
an error for the redirect. The (small) index itself is otherwise re-read after the TTL (and on a miss, at
most once a second), which is how a new group-version shows up. Resolved kind schemas are cached
per (document URL, kind) already encoded as ``google.protobuf.Struct`` bytes: an inlined
Deployment schema is ~0.5 MB, and encoding it per call cost ~8 ms.

Inlining: a ``$ref`` to ``#/components/schemas/X`` is replaced by X's (recursively inlined)
schema; sibling keys of the ``$ref`` are kept and win. A reference to a schema that is already
being expanded on the current path (``JSONSchemaProps`` refers to itself) is cut: it becomes
``{"description": "...", "x-otterscale-recursive-ref": "X"}``, which every validator accepts as
"anything". All other keys, including every ``x-kubernetes-*`` extension, are kept verbatim.
Uses the agent's own credentials (no impersonation): schemas are not secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ._discovery import DEFAULT_TTL, MISS_REFRESH_INTERVAL
from ._errors import KubernetesUnavailableError, UnknownKindError
from ._kube import KubeClient, loads
from ._structs import struct_bytes

logger = logging.getLogger(__name__)

__all__ = ["SchemaCache", "find_component", "inline_refs"]

_REF_PREFIX = "#/components/schemas/"
_MAX_DOCUMENTS = 32
_MAX_RESOLVED = 256
_MOVED_PERMANENTLY, _NOT_MODIFIED, _NOT_FOUND = 301, 304, 404


class _DocumentMoved(Exception):
    """The document URL is outdated: 301 to ``location`` (the current URL), or 404 (``""``)."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


def _url_hash(url: str) -> str:
    values = parse_qs(urlsplit(url).query).get("hash")
    return values[0] if values else ""


def _same_document(url: str, location: str) -> str:
    """``location`` if it is the same group-version's document under another hash, else ``""``.

    The agent only ever follows a redirect to its own server's document of the same path.
    """
    old, new = urlsplit(url), urlsplit(location)
    if new.scheme or new.netloc or new.path != old.path or not _url_hash(location):
        return ""
    return location


def find_component(schemas: Mapping[str, Any], group: str, version: str, kind: str) -> str | None:
    """Name of the component whose ``x-kubernetes-group-version-kind`` names the kind."""
    for name, schema in schemas.items():
        if not isinstance(schema, Mapping):
            continue
        for gvk in schema.get("x-kubernetes-group-version-kind") or ():
            if (
                isinstance(gvk, Mapping)
                and gvk.get("kind") == kind
                and gvk.get("version") == version
                and (gvk.get("group") or "") == group
            ):
                return name
    return None


def inline_refs(schemas: Mapping[str, Any], root: str) -> dict[str, Any]:
    """Component ``root`` with every reference inlined and reference cycles cut."""
    memo: dict[str, Any] = {}  # fully expanded components whose expansion cut no cycle
    active: list[str] = []
    active_set: set[str] = set()

    def expand_ref(name: str) -> tuple[Any, bool]:
        if name in memo:
            return memo[name], False
        if name in active_set:
            return {
                "description": f"Recursive reference to {name}, not expanded.",
                "x-otterscale-recursive-ref": name,
            }, True
        target = schemas.get(name)
        if target is None:
            logger.warning("OpenAPI reference to missing component %s left as is", name)
            return {"$ref": _REF_PREFIX + name}, False
        active.append(name)
        active_set.add(name)
        try:
            value, cut = walk(target)
        finally:
            active.pop()
            active_set.discard(name)
        if not cut:
            memo[name] = value
        return value, cut

    def walk(node: Any) -> tuple[Any, bool]:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
                name = ref[len(_REF_PREFIX) :].replace("~1", "/").replace("~0", "~")
                target, cut = expand_ref(name)
                if len(node) == 1:
                    return target, cut
                merged = dict(target) if isinstance(target, dict) else {}
                for key, value in node.items():
                    if key != "$ref":
                        merged[key], sub_cut = walk(value)
                        cut = cut or sub_cut
                return merged, cut
            out: dict[str, Any] = {}
            any_cut = False
            for key, value in node.items():
                out[key], sub_cut = walk(value)
                any_cut = any_cut or sub_cut
            return out, any_cut
        if isinstance(node, list):
            items = []
            any_cut = False
            for value in node:
                item, sub_cut = walk(value)
                items.append(item)
                any_cut = any_cut or sub_cut
            return items, any_cut
        return node, False

    result, _ = expand_ref(root)
    return dict(result)


class SchemaCache:
    """Kind schemas of one cluster, cached by OpenAPI document hash."""

    def __init__(
        self,
        client: KubeClient,
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._index: dict[str, str] = {}
        self._index_at = float("-inf")
        self._index_lock = asyncio.Lock()
        self._last_miss_refresh = float("-inf")
        self._documents: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._document_locks: dict[str, asyncio.Lock] = {}
        self._resolved: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    async def schema(self, group: str, version: str, kind: str) -> bytes:
        """The kind's inlined schema as serialized ``google.protobuf.Struct``.

        UnknownKindError (not_found) if the cluster does not know the group-version or kind.
        """
        gv = f"apis/{group}/{version}" if group else f"api/{version}"
        url, document = await self._current_document(gv)
        key = (url, kind)
        cached = self._resolved.get(key)
        if cached is not None:
            self._resolved.move_to_end(key)
            return cached
        schemas = (document.get("components") or {}).get("schemas") or {}
        name = find_component(schemas, group, version, kind)
        if name is None:
            gv_name = f"{group}/{version}" if group else version
            raise UnknownKindError(f'kind "{kind}" is not defined in {gv_name}')
        resolved = struct_bytes(inline_refs(schemas, name))
        if _url_hash(url):  # without a hash the document may change under the same URL
            self._resolved[key] = resolved
        while len(self._resolved) > _MAX_RESOLVED:
            self._resolved.popitem(last=False)
        return resolved

    async def _current_document(self, gv: str) -> tuple[str, dict[str, Any]]:
        """The URL and the current document of ``gv`` (one redirect followed or index re-read)."""
        seen = self._index_at
        url = await self._document_url(gv)
        for _ in range(2):
            if url is None:
                raise UnknownKindError(f"the server has no OpenAPI v3 document for {gv.split('/', 1)[1]}")
            try:
                return url, await self._document(url)
            except _DocumentMoved as moved:
                logger.debug("OpenAPI document %s changed or went away", url.split("?")[0])
                if moved.location:
                    url = self._index[gv] = moved.location
                else:
                    await self._refresh_index(seen)
                    url = self._index.get(gv)
        raise KubernetesUnavailableError(
            f"the OpenAPI document of {gv.split('/', 1)[1]} changed twice while it was read; try again"
        )

    async def _document_url(self, gv: str) -> str | None:
        if self._clock() - self._index_at >= self._ttl:
            await self._refresh_index(self._index_at)
        url = self._index.get(gv)
        if url is None and self._clock() - self._last_miss_refresh >= MISS_REFRESH_INTERVAL:
            self._last_miss_refresh = self._clock()
            await self._refresh_index(self._index_at)
            url = self._index.get(gv)
        return url

    async def _refresh_index(self, seen_at: float) -> None:
        async with self._index_lock:
            if self._index_at != seen_at:
                return  # refreshed by another caller meanwhile
            started = self._clock()
            doc = await self._client.request_json("GET", "/openapi/v3")
            paths = doc.get("paths") if isinstance(doc, dict) else None
            index: dict[str, str] = {}
            for gv, entry in (paths or {}).items():
                if isinstance(entry, dict) and isinstance(entry.get("serverRelativeURL"), str):
                    index[gv] = entry["serverRelativeURL"]
            self._index = index
            self._index_at = started

    async def _document(self, url: str) -> dict[str, Any]:
        """The document at ``url`` if it is still current; _DocumentMoved if it is not.

        A cached document is revalidated with ``If-None-Match`` (its hash is kube-apiserver's
        ETag): 304 keeps it, for one small round trip per call.
        """
        cached = self._documents.get(url)
        if cached is not None:
            fresh = await self._fetch(url, revalidate=True)
            if fresh is None:
                self._documents.move_to_end(url)
                return cached
            return self._remember(url, fresh)
        lock = self._document_locks.setdefault(url, asyncio.Lock())
        try:
            async with lock:
                doc = self._documents.get(url)
                if doc is None:
                    fetched = await self._fetch(url, revalidate=False)
                    doc = self._remember(url, fetched or {})
        finally:
            self._document_locks.pop(url, None)
        return doc

    async def _fetch(self, url: str, *, revalidate: bool) -> dict[str, Any] | None:
        """GET the document (None: 304, unchanged); _DocumentMoved on 301 or 404."""
        headers = {"If-None-Match": f'"{_url_hash(url)}"'} if revalidate and _url_hash(url) else None
        answer = await self._client.exchange("GET", url, extra_headers=headers)
        if revalidate and answer.status == _NOT_MODIFIED:
            return None
        if answer.status in (_MOVED_PERMANENTLY, _NOT_FOUND):
            self._documents.pop(url, None)
            moved = answer.status == _MOVED_PERMANENTLY
            raise _DocumentMoved(_same_document(url, answer.location) if moved else "")
        if answer.status >= 300:
            raise answer.error()
        try:
            decoded = loads(answer.body)
        except ValueError as exc:
            raise KubernetesUnavailableError(f"kubernetes API returned invalid JSON for {url}") from exc
        return decoded if isinstance(decoded, dict) else {}

    def _remember(self, url: str, doc: dict[str, Any]) -> dict[str, Any]:
        if _url_hash(url):  # without a hash the document may change under the same URL
            self._documents[url] = doc
            self._documents.move_to_end(url)
            while len(self._documents) > _MAX_DOCUMENTS:
                self._documents.popitem(last=False)
        return doc
