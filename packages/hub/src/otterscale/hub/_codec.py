"""Pass-through codecs: the hub forwards message bytes; it decodes only a request's ``cluster``.

connectrpc frames messages (Connect, gRPC, gRPC-Web envelopes) and hands each message's bytes
to a codec. :class:`PassthroughCodec` keeps those bytes as a :class:`RawMessage` instead of
building a protobuf object, and writes them back unchanged, so:

- a response from an agent (a List of 5,000 objects, a stream of Watch events) is never decoded
  or re-encoded in the hub: only re-framed for the caller's protocol;
- the caller's codec (binary or JSON) is forwarded to the agent, which answers in it.

The one field the hub needs is the request's ``cluster`` (field 1 of every ResourceService
request, a string): :func:`peek_cluster` reads it from the protobuf wire format or the JSON
object without decoding anything else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

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


def peek_cluster(message: RawMessage) -> str:
    """The request's ``cluster`` (field 1), or "" when it is not set.

    Raises :class:`MalformedRequestError` when the message cannot be read that far.
    """
    if message.codec == CODEC_JSON:
        return _json_cluster(message.data)
    return _proto_cluster(message.data)


def _json_cluster(data: bytes) -> str:
    try:
        document = json.loads(data) if data else {}
    except (ValueError, UnicodeDecodeError):
        raise MalformedRequestError("the request is not valid JSON") from None
    if not isinstance(document, dict):
        raise MalformedRequestError("the request must be a JSON object")
    value = document.get("cluster")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedRequestError("the request's cluster must be a string")
    return value


def _proto_cluster(data: bytes) -> str:
    """Scan the top-level fields; the last occurrence of field 1 wins, as in protobuf."""
    found: bytes | None = None
    view = memoryview(data)
    position, end = 0, len(data)
    try:
        while position < end:
            key, position = _varint(view, position)
            field, wire = key >> 3, key & 7
            if field == 0:
                raise MalformedRequestError("the request is not a valid protobuf message (field 0)")
            if wire == _WIRE_VARINT:
                _, position = _varint(view, position)
            elif wire == _WIRE_FIXED64:
                position += 8
            elif wire == _WIRE_FIXED32:
                position += 4
            elif wire == _WIRE_LEN:
                length, position = _varint(view, position)
                if field == _CLUSTER_FIELD:
                    found = bytes(view[position : position + length])
                position += length
            else:
                raise MalformedRequestError(f"the request is not a valid protobuf message (wire type {wire})")
            if position > end:
                raise MalformedRequestError("the request is not a valid protobuf message (truncated)")
    except IndexError:
        raise MalformedRequestError("the request is not a valid protobuf message (truncated)") from None
    if found is None:
        return ""
    try:
        return found.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequestError("the request's cluster is not valid UTF-8") from None


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
