"""Splicing agents' answers into fan-out messages without decoding the objects in them.

A hub that decoded every object of every cluster would pay protobuf Struct decoding per object
(milliseconds per thousand) and hold the objects twice. Instead:

- **protobuf**: a nested message on the wire is a tag, a length and bytes, so an agent's
  ``ListResponse`` (or ``WatchEvent``) becomes ``ClusterList.list`` (``ClusterEvent.event``) by
  writing a tag and a length in front of its bytes, verbatim. What the hub needs from an answer
  (resourceVersion, continue token, remaining count, item count; an event's type and
  resourceVersion) is read by hopping over the top-level fields (:func:`scan_list`,
  :func:`scan_event`): a varint per field, no Struct is decoded (an ERROR event, which carries a
  small Status, is the one exception).
- **JSON** (a client speaking Connect JSON gets agents' JSON answers, asked for in JSON): the
  agent's JSON text is placed as the value of ``"list"`` / ``"event"`` in the hub's own JSON, and
  the few values the hub needs are read with orjson.

The rest of each message (statuses, cursor, progress, checkpoints) is small and built with the
generated classes. Nothing here logs message content.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf import json_format  # type: ignore[import-untyped]  # no stubs for protobuf 7
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]

from otterscale.resource.v1 import resource_pb2 as pb

from .._codec import CODEC_JSON

logger = logging.getLogger(__name__)

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Field numbers (the .proto files are the source; tests compare them with the descriptors).
LIST_RESOURCE_VERSION, LIST_CONTINUE, LIST_REMAINING, LIST_ITEMS = 1, 2, 3, 4
EVENT_TYPE, EVENT_RESOURCE, EVENT_RESOURCE_VERSION, EVENT_STATUS = 1, 2, 3, 4
RESPONSE_LISTS = 1  # MultiListResponse.lists
CLUSTER_NAME, CLUSTER_PAYLOAD = 1, 2  # ClusterList.{cluster, list}, ClusterEvent.{cluster, event}
WATCH_RESPONSE_EVENT = 1  # MultiWatchResponse.event

TYPE_ADDED = pb.WatchEvent.TYPE_ADDED
TYPE_BOOKMARK = pb.WatchEvent.TYPE_BOOKMARK
TYPE_ERROR = pb.WatchEvent.TYPE_ERROR


class WireError(ValueError):
    """An agent's answer cannot be read (it is not the message it should be)."""


@dataclass(frozen=True, slots=True)
class ListMeta:
    """What the hub needs from one agent's ListResponse."""

    resource_version: str
    continue_token: str
    remaining: int
    items: int


@dataclass(frozen=True, slots=True)
class EventMeta:
    """What the hub needs from one agent's WatchEvent (``status_code``: an ERROR's Status.code)."""

    type: int
    resource_version: str
    status_code: int = 0
    status_message: str = ""


# --------------------------------------------------------------------------------------------------
# protobuf wire format


def varint(value: int) -> bytes:
    """``value`` (non-negative) as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def len_prefix(field: int, length: int) -> bytes:
    """The tag and length of a length-delimited field of ``length`` bytes."""
    return varint((field << 3) | _LEN) + varint(length)


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        try:
            byte = view[position]
        except IndexError:
            raise WireError("truncated varint") from None
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 70:
            raise WireError("varint too long")


def _fields(data: bytes) -> Any:
    """Yield (field, wire type, value or (start, end)) for each top-level field of ``data``."""
    view = memoryview(data)
    position, end = 0, len(data)
    while position < end:
        key, position = _read_varint(view, position)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire == _VARINT:
            value, position = _read_varint(view, position)
            yield field, wire, value
        elif wire == _LEN:
            length, position = _read_varint(view, position)
            if position + length > end:
                raise WireError("truncated field")
            yield field, wire, (position, position + length)
            position += length
        elif wire == _I64:
            position += 8
        elif wire == _I32:
            position += 4
        else:
            raise WireError(f"wire type {wire}")
        if position > end:
            raise WireError("truncated field")


def _text(data: bytes, span: tuple[int, int]) -> str:
    try:
        return data[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("a string field is not UTF-8") from None


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_ITEM_TAG = (LIST_ITEMS << 3) | _LEN


def _count_items(data: bytes, position: int) -> int | None:
    """Items from ``position`` on, when nothing but items follows (how agents write a List: fields
    1-3, then every item); None otherwise. One tight loop over the lengths, no generator."""
    end = len(data)
    count = 0
    while position < end:
        if data[position] != _ITEM_TAG:
            return None
        position += 1
        length = 0
        shift = 0
        while True:
            if position >= end:
                raise WireError("truncated varint")
            byte = data[position]
            position += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift >= 70:
                raise WireError("varint too long")
        position += length
        count += 1
    if position > end:
        raise WireError("truncated field")
    return count


def _scan_list_proto(data: bytes) -> ListMeta:
    rv = token = ""
    remaining = items = 0
    view = memoryview(data)
    position = 0
    # The header (fields 1-3) comes first; from the first item on, count items the fast way.
    while position < len(data) and data[position] != _ITEM_TAG:
        key, after = _read_varint(view, position)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, after = _read_varint(view, after)
            if field == LIST_REMAINING:
                remaining = _int64(value)
        elif wire == _LEN:
            length, after = _read_varint(view, after)
            if after + length > len(data):
                raise WireError("truncated field")
            if field == LIST_RESOURCE_VERSION:
                rv = _text(data, (after, after + length))
            elif field == LIST_CONTINUE:
                token = _text(data, (after, after + length))
            after += length
        else:
            break  # an unexpected shape: the general scan below reads it
        position = after
    counted = _count_items(data, position)
    if counted is not None:
        return ListMeta(rv, token, remaining, counted)
    rv = token = ""
    remaining = items = 0
    for field, wire, value in _fields(data):
        if field == LIST_ITEMS and wire == _LEN:
            items += 1
        elif field == LIST_RESOURCE_VERSION and wire == _LEN:
            rv = _text(data, value)
        elif field == LIST_CONTINUE and wire == _LEN:
            token = _text(data, value)
        elif field == LIST_REMAINING and wire == _VARINT:
            remaining = _int64(value)
    return ListMeta(rv, token, remaining, items)


def _scan_event_proto(data: bytes) -> EventMeta:
    kind = 0
    rv = ""
    for field, wire, value in _fields(data):
        if field == EVENT_TYPE and wire == _VARINT:
            kind = value
        elif field == EVENT_RESOURCE_VERSION and wire == _LEN:
            rv = _text(data, value)
    if kind == TYPE_ERROR:
        event = pb.WatchEvent.FromString(data)  # small: a Status, no object
        fields = event.status.fields
        code = int(fields["code"].number_value) if "code" in fields else 0
        message = fields["message"].string_value if "message" in fields else ""
        return EventMeta(kind, rv, code, message)
    return EventMeta(kind, rv)


# --------------------------------------------------------------------------------------------------
# JSON


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise WireError("not JSON") from None
    if not isinstance(document, dict):
        raise WireError("not a JSON object")
    return document


def _scan_list_json(data: bytes) -> ListMeta:
    document = _json_object(data)
    items = document.get("items") or []
    try:
        remaining = int(document.get("remainingItemCount") or 0)
    except (TypeError, ValueError):
        raise WireError("remainingItemCount is not a number") from None
    if not isinstance(items, list):
        raise WireError("items is not a list")
    return ListMeta(
        str(document.get("resourceVersion") or ""), str(document.get("continue") or ""), remaining, len(items)
    )


def _scan_event_json(data: bytes) -> EventMeta:
    document = _json_object(data)
    kind = document.get("type", 0)
    if isinstance(kind, str):
        kind = pb.WatchEvent.Type.Value(kind) if kind in pb.WatchEvent.Type.keys() else 0  # noqa: SIM118
    rv = str(document.get("resourceVersion") or "")
    if kind == TYPE_ERROR:
        status = document.get("status") or {}
        code = status.get("code", 0) if isinstance(status, dict) else 0
        message = status.get("message", "") if isinstance(status, dict) else ""
        return EventMeta(kind, rv, int(code) if isinstance(code, int | float) else 0, str(message))
    return EventMeta(int(kind) if isinstance(kind, int) else 0, rv)


# --------------------------------------------------------------------------------------------------
# Both codecs


def scan_list(data: bytes, codec: str) -> ListMeta:
    """What the hub needs from an agent's ListResponse in ``codec``; :class:`WireError` if unreadable."""
    return _scan_list_json(data) if codec == CODEC_JSON else _scan_list_proto(data)


def scan_event(data: bytes, codec: str) -> EventMeta:
    """What the hub needs from an agent's WatchEvent in ``codec``; :class:`WireError` if unreadable."""
    return _scan_event_json(data) if codec == CODEC_JSON else _scan_event_proto(data)


def encode(message: Message, codec: str) -> bytes:
    """``message`` in ``codec`` (JSON as connectrpc's JSON codec writes it)."""
    if codec == CODEC_JSON:
        text: str = json_format.MessageToJson(message)
        return text.encode()
    data: bytes = message.SerializeToString()
    return data


def decode(data: bytes, message: Message, codec: str) -> None:
    """Parse ``data`` in ``codec`` into ``message`` (unknown JSON fields are ignored, as by connectrpc).

    Raises :class:`WireError` saying why, whatever the parser's own exception was.
    """
    try:
        if codec == CODEC_JSON:
            json_format.Parse(data, message, ignore_unknown_fields=True)
        else:
            message.ParseFromString(data)
    except (DecodeError, json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WireError(reason) from None


def list_page(codec: str, lists: Sequence[tuple[str, bytes]], rest: Message) -> bytes:
    """A MultiListResponse: ``lists`` (cluster, agent ListResponse bytes) spliced, then ``rest``."""
    if codec == CODEC_JSON:
        tail = _compact_json(rest)
        if not lists:
            return tail
        parts = [b'{"lists":[']
        for i, (cluster, data) in enumerate(lists):
            if i:
                parts.append(b",")
            parts += [b'{"cluster":', orjson.dumps(cluster), b',"list":', data, b"}"]
        parts.append(b"]")
        parts.append(b"}" if tail == b"{}" else b"," + tail[1:])
        return b"".join(parts)
    parts = []
    for cluster, data in lists:
        name = cluster.encode()
        head = len_prefix(CLUSTER_NAME, len(name)) + name + len_prefix(CLUSTER_PAYLOAD, len(data))
        parts += [len_prefix(RESPONSE_LISTS, len(head) + len(data)), head, data]
    parts.append(rest.SerializeToString())
    return b"".join(parts)


def watch_event(codec: str, cluster: str, data: bytes) -> bytes:
    """A MultiWatchResponse carrying ``cluster``'s WatchEvent ``data`` (in ``codec``) verbatim."""
    if codec == CODEC_JSON:
        return b'{"event":{"cluster":' + orjson.dumps(cluster) + b',"event":' + data + b"}}"
    name = cluster.encode()
    head = len_prefix(CLUSTER_NAME, len(name)) + name + len_prefix(CLUSTER_PAYLOAD, len(data))
    return len_prefix(WATCH_RESPONSE_EVENT, len(head) + len(data)) + head + data


def _compact_json(message: Message) -> bytes:
    return orjson.dumps(json_format.MessageToDict(message))


#: The annotation of the bookmark that ends a watch's initial events (Kubernetes WatchList).
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


def initial_events_end(data: bytes, codec: str) -> bool:
    """Whether a BOOKMARK event (``data``) marks the end of the initial events (small: decoded)."""
    if codec == CODEC_JSON:
        document = _json_object(data)
        resource = document.get("resource")
        obj = resource.get("object") if isinstance(resource, dict) else None
        metadata = obj.get("metadata") if isinstance(obj, dict) else None
        annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
        return isinstance(annotations, dict) and annotations.get(INITIAL_EVENTS_END) == "true"
    event = pb.WatchEvent.FromString(data)
    fields = event.resource.object.fields
    if "metadata" not in fields:
        return False
    metadata = fields["metadata"].struct_value.fields
    if "annotations" not in metadata:
        return False
    annotations = metadata["annotations"].struct_value.fields
    return INITIAL_EVENTS_END in annotations and annotations[INITIAL_EVENTS_END].string_value == "true"
