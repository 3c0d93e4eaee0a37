"""Reading a request's cluster from raw bytes (binary and JSON), without decoding the rest."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from otterscale.hub._codec import CODEC_JSON, CODEC_PROTO, PassthroughCodec, RawMessage, peek_cluster
from otterscale.hub._errors import MalformedRequestError
from otterscale.resource.v1 import resource_pb2 as pb

REQUESTS: list[Message] = [
    pb.DiscoveryRequest(cluster="alpha"),
    pb.SchemaRequest(cluster="alpha", group="apps", version="v1", kind="Deployment"),
    pb.ListRequest(cluster="alpha", version="v1", resource="pods", limit=500, label_selector="a=b"),
    pb.GetRequest(cluster="alpha", version="v1", resource="pods", namespace="ns", name="p"),
    pb.CreateRequest(cluster="alpha", manifest=b"\x00\xff" * 1000),
    pb.ApplyRequest(cluster="alpha", name="x", manifest=b"kind: X", force=True, field_manager="ui"),
    pb.DeleteRequest(cluster="alpha", name="x", grace_period_seconds=0),
    pb.WatchRequest(cluster="alpha", version="v1", resource="pods", resource_version="12"),
]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_every_request_type(message: Message) -> None:
    assert peek_cluster(RawMessage(message.SerializeToString(), CODEC_PROTO)) == "alpha"
    text = json_format.MessageToJson(message).encode()
    assert peek_cluster(RawMessage(text, CODEC_JSON)) == "alpha"


def test_every_resource_service_request_has_cluster_as_field_1() -> None:
    service = pb.DESCRIPTOR.services_by_name["ResourceService"]
    for method in service.methods:
        field = method.input_type.fields_by_name["cluster"]
        assert field.number == 1, method.name
        assert field.type == field.TYPE_STRING


def test_field_order_and_repetition() -> None:
    # Fields may come in any order; the last occurrence of a scalar wins, as in protobuf.
    later = pb.GetRequest(name="p").SerializeToString() + pb.GetRequest(cluster="beta").SerializeToString()
    assert peek_cluster(RawMessage(later, CODEC_PROTO)) == "beta"
    twice = (
        pb.GetRequest(cluster="alpha").SerializeToString() + pb.GetRequest(cluster="beta").SerializeToString()
    )
    assert peek_cluster(RawMessage(twice, CODEC_PROTO)) == "beta"
    # Unknown fields of every wire type are skipped.
    unknown = bytes([0x78, 0x01]) + bytes([0x81, 0x01]) + b"\x00" * 8 + bytes([0x8D, 0x01]) + b"\x00" * 4
    assert (
        peek_cluster(RawMessage(unknown + pb.GetRequest(cluster="c").SerializeToString(), CODEC_PROTO)) == "c"
    )


def test_absent_cluster_is_empty() -> None:
    assert peek_cluster(RawMessage(b"", CODEC_PROTO)) == ""
    assert peek_cluster(RawMessage(b"", CODEC_JSON)) == ""
    assert peek_cluster(RawMessage(b'{"cluster": null}', CODEC_JSON)) == ""
    assert peek_cluster(RawMessage(pb.GetRequest(name="x").SerializeToString(), CODEC_PROTO)) == ""


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05ab", b"\x0a", b"\xff" * 11, b"\x0b\x00", b"\x00\x01", b"\x0a\x02\xff\xfe"],
    ids=["truncated-string", "truncated-length", "long-varint", "group", "field-0", "bad-utf8"],
)
def test_malformed_binary(data: bytes) -> None:
    with pytest.raises(MalformedRequestError):
        peek_cluster(RawMessage(data, CODEC_PROTO))


@pytest.mark.parametrize("data", [b"{", b"[]", b'{"cluster": 3}', b"\xff"])
def test_malformed_json(data: bytes) -> None:
    with pytest.raises(MalformedRequestError):
        peek_cluster(RawMessage(data, CODEC_JSON))


def test_passthrough_codec_keeps_bytes() -> None:
    codec = PassthroughCodec(CODEC_PROTO)
    raw = codec.decode(bytearray(b"\x0a\x01a"), object)
    assert raw == RawMessage(b"\x0a\x01a", CODEC_PROTO)
    assert codec.encode(raw) == b"\x0a\x01a"
    with pytest.raises(ValueError, match="cannot be sent"):
        PassthroughCodec(CODEC_JSON).encode(raw)
    with pytest.raises(ValueError, match="unknown codec"):
        PassthroughCodec("xml")
