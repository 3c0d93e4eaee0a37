"""The ResourceService's codecs: connectrpc's protobuf binary and JSON codecs, plus messages that
are already serialized.

A big List is built as protobuf wire bytes (:mod:`._structs`); turning those into a
``ListResponse`` object only for connectrpc to serialize it straight back cost two passes over
megabytes (``MergeFromString`` ~3 ms and ``SerializeToString`` ~11 ms for 5,000 ConfigMaps,
5.2 MB). A handler may instead return a :class:`SerializedMessage`: the binary codec (Connect and
gRPC) sends its bytes as they are, the JSON codec parses them once and encodes JSON as before.
Requests are decoded exactly as by connectrpc's codecs.
"""

from __future__ import annotations

import logging
from typing import Any

from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec

logger = logging.getLogger(__name__)

__all__ = ["SerializedMessage", "resource_codecs"]


class SerializedMessage:
    """A response message of ``message_class``, already in protobuf wire format (``data``)."""

    __slots__ = ("data", "message_class")

    def __init__(self, data: bytes, message_class: type[Any]) -> None:
        self.data = data
        self.message_class = message_class

    def message(self) -> Any:
        """The message object (parses ``data``)."""
        return self.message_class.FromString(self.data)


class _BinaryCodec:
    def __init__(self) -> None:
        self._inner = google_protobuf_binary_codec()

    def name(self) -> str:
        return str(self._inner.name())

    def encode(self, message: Any) -> bytes:
        if type(message) is SerializedMessage:
            return message.data
        return bytes(self._inner.encode(message))

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        return self._inner.decode(data, message_class)


class _JSONCodec:
    def __init__(self) -> None:
        self._inner = google_protobuf_json_codec()

    def name(self) -> str:
        return str(self._inner.name())

    def encode(self, message: Any) -> bytes:
        if type(message) is SerializedMessage:
            message = message.message()
        return bytes(self._inner.encode(message))

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        return self._inner.decode(data, message_class)


def resource_codecs() -> list[Any]:
    """Binary and JSON codecs (connectrpc's defaults) that also send :class:`SerializedMessage`."""
    return [_BinaryCodec(), _JSONCodec()]
