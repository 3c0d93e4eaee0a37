"""The ResourceService codecs (otterscale.agent._codecs): a List sent as pre-built wire bytes is
the same message, in both codecs, as the ListResponse object the agent used to build."""

from __future__ import annotations

from typing import Any

from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from hypothesis import given, settings
from hypothesis import strategies as st

from otterscale.agent._codecs import SerializedMessage, resource_codecs
from otterscale.agent._structs import field_bytes, struct_bytes
from otterscale.resource.v1 import resource_pb2 as pb

ITEMS = pb.ListResponse.DESCRIPTOR.fields_by_name["items"].number
OBJECT = pb.Resource.DESCRIPTOR.fields_by_name["object"].number

names = st.text(min_size=0, max_size=20)
objects = st.lists(
    st.fixed_dictionaries(
        {
            "metadata": st.fixed_dictionaries({"name": names, "namespace": names}),
            "data": st.dictionaries(names, names),
        }
    ),
    max_size=20,
)


def _both(
    items: list[dict[str, Any]], rv: str, token: str, remaining: int
) -> tuple[pb.ListResponse, SerializedMessage]:
    payload = field_bytes(ITEMS, (field_bytes(OBJECT, (struct_bytes(item),)) for item in items))
    old = pb.ListResponse(resource_version=rv, remaining_item_count=remaining)  # as the agent did
    setattr(old, "continue", token)
    old.MergeFromString(payload)
    header = pb.ListResponse(resource_version=rv, remaining_item_count=remaining)
    setattr(header, "continue", token)
    return old, SerializedMessage(header.SerializeToString() + payload, pb.ListResponse)


@settings(max_examples=100, deadline=None)
@given(objects, names, names, st.integers(min_value=0, max_value=2**40))
def test_serialized_list_is_the_same_message(
    items: list[dict[str, Any]], rv: str, token: str, remaining: int
) -> None:
    old, new = _both(items, rv, token, remaining)
    binary, json_codec = resource_codecs()
    assert binary.name() == "proto"
    assert json_codec.name() == "json"
    assert binary.encode(new) == new.data
    assert pb.ListResponse.FromString(binary.encode(new)) == old
    if not items:  # no map fields: the serialization is deterministic, so bytes match too
        assert binary.encode(new) == google_protobuf_binary_codec().encode(old)
    assert json_codec.encode(new) == google_protobuf_json_codec().encode(old)


def test_ordinary_messages_and_requests_are_unchanged() -> None:
    binary, json_codec = resource_codecs()
    message = pb.GetRequest(cluster="c", version="v1", resource="configmaps", name="x")
    assert binary.encode(message) == message.SerializeToString()
    assert json_codec.encode(message) == google_protobuf_json_codec().encode(message)
    assert binary.decode(message.SerializeToString(), pb.GetRequest) == message
    assert json_codec.decode(json_codec.encode(message), pb.GetRequest) == message
