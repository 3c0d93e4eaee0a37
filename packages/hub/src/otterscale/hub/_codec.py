"""Pass-through codecs: the hub forwards message bytes; it decodes only what routes a call.

connectrpc frames messages (Connect, gRPC, gRPC-Web envelopes) and hands each message's bytes
to a codec. :class:`PassthroughCodec` keeps those bytes as a :class:`RawMessage` instead of
building a protobuf object, and writes them back unchanged, so:

- a response from an agent (a List of 5,000 objects, a stream of Watch events) is never decoded
  or re-encoded in the hub: only re-framed for the caller's protocol;
- the caller's codec (binary or JSON) is forwarded to the agent, which answers in it.

The one thing the hub needs from a request is the string that names its cluster (field 1,
``cluster``, of every ResourceService request; a nested field such as ``start.cluster``, or a
session id, where a method's route says so: see :mod:`._routes`). :func:`peek_string` reads it
from the protobuf wire format or the JSON object without decoding anything else, with protobuf's
own rules: the last occurrence of a scalar wins, occurrences of a message field merge, and a
later member of a oneof clears the earlier one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import MalformedRequestError

logger = logging.getLogger(__name__)

CODEC_PROTO = "proto"
CODEC_JSON = "json"

_WIRE_VARINT = 0
_WIRE_FIXED64 = 1
_WIRE_LEN = 2
_WIRE_FIXED32 = 5
_CLUSTER_FIELD = 1


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message's bytes, in the encoding named by ``codec`` ("proto" or "json")."""

    data: bytes
    codec: str


class PassthroughCodec:
    """A connectrpc codec (``name``/``encode``/``decode``) that keeps message bytes as they are."""

    def __init__(self, name: str) -> None:
        if name not in (CODEC_PROTO, CODEC_JSON):
            raise ValueError(f"unknown codec {name!r}")
        self._name = name

    def name(self) -> str:
        """The codec name of the content type: ``proto`` or ``json``."""
        return self._name

    def encode(self, message: RawMessage) -> bytes:
        """The message's bytes (they must be in this codec's encoding)."""
        if message.codec != self._name:
            raise ValueError(f"a {message.codec} message cannot be sent as {self._name}")
        return message.data

    def decode(self, data: bytes | bytearray, message_class: object) -> RawMessage:
        """Keep ``data``; ``message_class`` is ignored."""
        return RawMessage(bytes(data), self._name)


@dataclass(frozen=True, slots=True)
class FieldStep:
    """One field on the way from a request to the string that routes it.

    ``siblings`` are the other members of the field's oneof with their wire types: a later one
    clears the field, as a protobuf parser does.
    """

    number: int
    name: str
    json_name: str
    siblings: frozenset[tuple[int, int]] = frozenset()


#: Field 1, ``cluster``: where every ResourceService request names its cluster.
CLUSTER_PATH = (FieldStep(_CLUSTER_FIELD, "cluster", "cluster"),)


def peek_cluster(message: RawMessage) -> str:
    """The request's ``cluster`` (field 1), or "" when it is not set.

    Raises :class:`MalformedRequestError` when the message cannot be read that far.
    """
    return peek_string(message, CLUSTER_PATH)


def peek_string(message: RawMessage, path: Sequence[FieldStep]) -> str:
    """The string field at ``path`` (message fields, then a string), or "" when it is not set.

    Raises :class:`MalformedRequestError` when the message cannot be read that far.
    """
    if message.codec == CODEC_JSON:
        return _json_string(message.data, path)
    return _proto_string(message.data, path)


def _dotted(path: Sequence[FieldStep]) -> str:
    return ".".join(step.name for step in path)


def _json_string(data: bytes, path: Sequence[FieldStep]) -> str:
    try:
        document = json.loads(data) if data else {}
    except (ValueError, UnicodeDecodeError):
        raise MalformedRequestError("the request is not valid JSON") from None
    if not isinstance(document, dict):
        raise MalformedRequestError("the request must be a JSON object")
    node: dict[str, Any] = document
    for depth, step in enumerate(path, 1):
        # A JSON parser accepts the lowerCamelCase name and the .proto name alike (not both).
        names = {step.json_name, step.name}
        present = [name for name in names if name in node]
        if len(present) > 1:
            raise MalformedRequestError(f"the request sets {step.json_name} and {step.name}; set one")
        value = node[present[0]] if present else None
        if value is None:
            return ""
        if depth == len(path):
            if not isinstance(value, str):
                raise MalformedRequestError(f"the request's {_dotted(path)} must be a string")
            return value
        if not isinstance(value, dict):
            raise MalformedRequestError(f"the request's {_dotted(path[:depth])} must be an object")
        node = value
    raise AssertionError("unreachable: the path is not empty")  # pragma: no cover


def _proto_string(data: bytes, path: Sequence[FieldStep]) -> str:
    for step in path[:-1]:
        # Occurrences of a message field merge, which is what their concatenation decodes to.
        data = b"".join(_occurrences(data, step))
    found = _occurrences(data, path[-1])
    if not found:
        return ""
    try:
        return found[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequestError(f"the request's {_dotted(path)} is not valid UTF-8") from None


def _occurrences(data: bytes, step: FieldStep) -> list[bytes]:
    """The payloads of ``step``'s length-delimited field in ``data``, after the last oneof switch.

    Every top-level field is scanned, so a message that is not valid protobuf that far is refused.
    """
    found: list[bytes] = []
    view = memoryview(data)
    position, end = 0, len(data)
    try:
        while position < end:
            key, position = _varint(view, position)
            field, wire = key >> 3, key & 7
            if field == 0:
                raise MalformedRequestError("the request is not a valid protobuf message (field 0)")
            start = position
            if wire == _WIRE_VARINT:
                _, position = _varint(view, position)
            elif wire == _WIRE_FIXED64:
                position += 8
            elif wire == _WIRE_FIXED32:
                position += 4
            elif wire == _WIRE_LEN:
                length, start = _varint(view, position)
                position = start + length
                if field == step.number:
                    found.append(bytes(view[start:position]))
            else:
                raise MalformedRequestError(f"the request is not a valid protobuf message (wire type {wire})")
            if position > end:
                raise MalformedRequestError("the request is not a valid protobuf message (truncated)")
            if (field, wire) in step.siblings:
                found.clear()
    except IndexError:
        raise MalformedRequestError("the request is not a valid protobuf message (truncated)") from None
    return found


def _varint(view: memoryview, position: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = view[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 64:
            raise MalformedRequestError("the request is not a valid protobuf message (varint too long)")
