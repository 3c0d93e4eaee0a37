"""The core/v1 Events of one object, as Describe shows them (like ``kubectl describe``).

Which events: those whose ``involvedObject.uid`` is the object's uid, listed in the object's
namespace (all namespaces for a cluster-scoped object). For a Node also those with
``involvedObject.kind=Node,involvedObject.name=<name>``: the kubelet records node events with the
node's *name* as uid, so a uid selector alone misses them. Both lists are merged and deduplicated
by event uid.

Order and bound: oldest first by ``eventTime``, else ``lastTimestamp``, else ``firstTimestamp``,
else ``metadata.creationTimestamp``; the newest ``limit`` are kept. kube-apiserver lists in key
(name) order, not time order, so finding the newest means reading every match: pages of
:data:`PAGE_SIZE` (``continue`` followed), holding at most ``limit`` + one page at a time, and at
most :data:`MAX_SCANNED` events per selector (an object with more is a storm; the answer then says
so). Events are cleaned like List items.

Listing events never fails the describe: the failure becomes a short reason for the caller
(:func:`events_error`). Runs as the caller, like every object call.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Iterable
from typing import Any

from connectrpc.code import Code

from ._discovery import APIResourceInfo
from ._errors import AgentError, KubernetesUnavailableError
from ._kube import Caller, KubeClient, loads
from ._objects import clean_object, collection_path, with_type_meta

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EVENTS_LIMIT",
    "EVENTS",
    "MAX_EVENTS_LIMIT",
    "MAX_SCANNED",
    "PAGE_SIZE",
    "EventsResult",
    "event_selectors",
    "event_sort_key",
    "events_error",
    "list_object_events",
]

#: Events returned when the request does not say (``DescribeRequest.events_limit`` absent).
DEFAULT_EVENTS_LIMIT = 100
#: Largest ``events_limit`` accepted.
MAX_EVENTS_LIMIT = 1000
#: Events per List page (kubectl's default chunk size).
PAGE_SIZE = 500
#: At most this many events are read per selector; beyond, the newest of those read are kept.
MAX_SCANNED = 10_000

#: core/v1 events: always served, so no discovery round trip is needed to address them.
EVENTS = APIResourceInfo(group="", version="v1", resource="events", kind="Event", namespaced=True)

_TIME_FIELDS = ("eventTime", "lastTimestamp", "firstTimestamp")
_OLDEST = datetime.datetime.min.replace(tzinfo=datetime.UTC)


def _escape(value: str) -> str:
    """A field selector value: ``\\``, ``,`` and ``=`` escaped as kube-apiserver expects."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


def event_selectors(info: APIResourceInfo, obj: dict[str, Any]) -> list[str]:
    """The field selectors whose events belong to ``obj`` (one, or two for a Node)."""
    metadata = obj.get("metadata") or {}
    selectors = []
    uid = str(metadata.get("uid") or "")
    if uid:
        selectors.append(f"involvedObject.uid={_escape(uid)}")
    name = str(metadata.get("name") or "")
    if info.group == "" and info.resource == "nodes" and name:
        selectors.append(f"involvedObject.kind=Node,involvedObject.name={_escape(name)}")
    return selectors


def _timestamp(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


def event_sort_key(event: dict[str, Any]) -> tuple[datetime.datetime, str, str]:
    """Oldest first: eventTime, else lastTimestamp, else firstTimestamp, else creationTimestamp.

    Parsed, not compared as text: ``eventTime`` has microseconds and the others do not, and
    ``...:05.5Z`` sorts before ``...:05Z`` as a string. Ties (and events with no time at all)
    are ordered by namespace and name, so the order is the same on every call.
    """
    metadata = event.get("metadata") or {}
    when = None
    for field in _TIME_FIELDS:
        when = _timestamp(event.get(field))
        if when is not None:
            break
    if when is None:
        when = _timestamp(metadata.get("creationTimestamp")) or _OLDEST
    return when, str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


def _identity(event: dict[str, Any]) -> str:
    metadata = event.get("metadata") or {}
    uid = metadata.get("uid")
    return str(uid) if uid else f"{metadata.get('namespace')}/{metadata.get('name')}"


def _newest(events: Iterable[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    ordered = sorted(events, key=event_sort_key)
    return ordered[-limit:] if limit else []


@dataclasses.dataclass(frozen=True, slots=True)
class EventsResult:
    """The events found (oldest first) and, when not all could be read, why."""

    events: list[dict[str, Any]]
    error: str = ""


def events_error(exc: AgentError, namespace: str) -> str:
    """The caller-facing reason why events could not be listed (never a stack trace)."""
    where = f'namespace "{namespace}"' if namespace else "any namespace (the object is cluster-scoped)"
    if exc.code is Code.PERMISSION_DENIED:
        return f"forbidden: cannot list events in {where}"
    return f"{exc.code.value}: cannot list events in {where}: {exc.message}"


async def list_object_events(
    client: KubeClient,
    info: APIResourceInfo,
    obj: dict[str, Any],
    *,
    caller: Caller,
    limit: int,
    time_limit: Callable[[], float | None],
) -> EventsResult:
    """The newest ``limit`` events of ``obj`` (see the module docstring); never raises AgentError.

    ``time_limit`` gives the call's remaining time before each request.
    """
    metadata = obj.get("metadata") or {}
    namespace = str(metadata.get("namespace") or "") if info.namespaced else ""
    selectors = event_selectors(info, obj)
    if not selectors:
        return EventsResult([], "the object has no metadata.uid, so its events cannot be found")
    found: dict[str, dict[str, Any]] = {}
    truncated = False
    try:
        for selector in selectors:
            truncated |= await _scan(client, namespace, selector, found, caller, limit, time_limit)
    except AgentError as exc:
        logger.debug("listing events of %s failed: %s", info.resource, exc.message)
        return EventsResult([], events_error(exc, namespace))
    events = [with_type_meta(clean_object(e), EVENTS) for e in _newest(found.values(), limit)]
    if truncated:
        return EventsResult(
            events,
            f"more than {MAX_SCANNED} events match; these are the newest of the first {MAX_SCANNED} listed",
        )
    return EventsResult(events)


async def _scan(
    client: KubeClient,
    namespace: str,
    selector: str,
    found: dict[str, dict[str, Any]],
    caller: Caller,
    limit: int,
    time_limit: Callable[[], float | None],
) -> bool:
    """Add the events matching ``selector`` to ``found``; True if it stopped at MAX_SCANNED."""
    token = ""
    scanned = 0
    while True:
        params = {"fieldSelector": selector, "limit": str(PAGE_SIZE)}
        if token:
            params["continue"] = token
        data, _ = await client.request(
            "GET", collection_path(EVENTS, namespace), params=params, caller=caller, time_limit=time_limit()
        )
        try:
            page = loads(data)
            items = page.get("items") or []
            token = str((page.get("metadata") or {}).get("continue") or "")
        except (ValueError, AttributeError) as exc:
            raise KubernetesUnavailableError("kubernetes API returned an invalid event list") from exc
        for item in items:
            if isinstance(item, dict):
                found[_identity(item)] = item
        scanned += len(items)
        if len(found) > limit + PAGE_SIZE:
            # Hold at most limit + one page: only the newest can be answered anyway.
            kept = _newest(found.values(), limit)
            found.clear()
            found.update((_identity(e), e) for e in kept)
        if not token:
            return False
        if scanned >= MAX_SCANNED:
            return True
