"""Splicing agents' answers into fan-out messages (pure): the result must equal what the generated
classes build from decoded messages, in both codecs, for any answer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otterscale.hub._codec import CODEC_JSON, CODEC_PROTO
from otterscale.hub._fanout import wire
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.multicluster_pb2 import (
    ClusterEvent,
    ClusterList,
    ClusterStatus,
    MultiListResponse,
    MultiWatchResponse,
    Progress,
)

CODECS = (CODEC_PROTO, CODEC_JSON)

_scalars = st.one_of(st.text(max_size=20), st.integers(-(10**6), 10**6), st.booleans(), st.none())
_objects = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.recursive(
        _scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    ),
    max_size=5,
)


def _list_response(rv: str, token: str, remaining: int, objects: list[dict[str, object]]) -> pb.ListResponse:
    response = pb.ListResponse(resource_version=rv, remaining_item_count=remaining)
    setattr(response, "continue", token)
    for obj in objects:
        item = response.items.add()
        item.object.update(obj)
    return response


def _encode(message: object, codec: str) -> bytes:
    return wire.encode(message, codec)  # type: ignore[arg-type]


def _decode(data: bytes, message: object, codec: str) -> object:
    wire.decode(data, message, codec)  # type: ignore[arg-type]
    return message


@settings(max_examples=150, deadline=None)
@given(
    rv=st.text(max_size=12),
    token=st.text(max_size=40),
    remaining=st.integers(0, 10**9),
    objects=st.lists(_objects, max_size=6),
    codec=st.sampled_from(CODECS),
)
def test_scanning_a_list_answer_reads_what_decoding_reads(
    rv: str, token: str, remaining: int, objects: list[dict[str, object]], codec: str
) -> None:
    response = _list_response(rv, token, remaining, objects)
    meta = wire.scan_list(_encode(response, codec), codec)
    assert meta == wire.ListMeta(rv, token, remaining, len(objects))


@settings(max_examples=100, deadline=None)
@given(
    pages=st.lists(
        st.tuples(
            st.sampled_from(["east", "west", "zürich-1"]), st.lists(_objects, max_size=3), st.text(max_size=8)
        ),
        max_size=4,
    ),
    codec=st.sampled_from(CODECS),
)
def test_a_spliced_page_equals_the_page_built_from_decoded_answers(
    pages: list[tuple[str, list[dict[str, object]], str]], codec: str
) -> None:
    answers = [(cluster, _list_response(rv, "", 0, objects)) for cluster, objects, rv in pages]
    rest = MultiListResponse(
        statuses=[ClusterStatus(cluster="east", outcome=ClusterStatus.OUTCOME_OK, items=2, final=True)],
        next_cursor="mlc1.abc",
        progress=Progress(clusters_total=2, items_returned=7, remaining_estimate=-1),
    )
    spliced = wire.list_page(codec, [(cluster, _encode(answer, codec)) for cluster, answer in answers], rest)
    expected = MultiListResponse()
    expected.CopyFrom(rest)
    expected.lists.extend(ClusterList(cluster=cluster, list=answer) for cluster, answer in answers)
    assert _decode(spliced, MultiListResponse(), codec) == expected
    if codec == CODEC_JSON:
        json.loads(spliced)  # well-formed JSON on its own


@pytest.mark.parametrize("codec", CODECS)
def test_an_empty_page_is_the_rest_alone(codec: str) -> None:
    rest = MultiListResponse(next_cursor="")
    assert _decode(wire.list_page(codec, [], rest), MultiListResponse(), codec) == rest


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from([pb.WatchEvent.TYPE_ADDED, pb.WatchEvent.TYPE_MODIFIED, pb.WatchEvent.TYPE_DELETED]),
    rv=st.text(max_size=12),
    obj=_objects,
    codec=st.sampled_from(CODECS),
)
def test_events_are_scanned_and_spliced_unchanged(
    kind: int, rv: str, obj: dict[str, object], codec: str
) -> None:
    event = pb.WatchEvent(type=kind, resource_version=rv)  # type: ignore[arg-type]
    event.resource.object.update(obj)
    data = _encode(event, codec)
    assert wire.scan_event(data, codec) == wire.EventMeta(kind, rv)
    spliced = wire.watch_event(codec, "west", data)
    expected = MultiWatchResponse(event=ClusterEvent(cluster="west", event=event))
    assert _decode(spliced, MultiWatchResponse(), codec) == expected


@pytest.mark.parametrize("codec", CODECS)
def test_error_events_carry_their_status_code(codec: str) -> None:
    event = pb.WatchEvent(type=pb.WatchEvent.TYPE_ERROR)
    event.status.update(
        {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}
    )
    meta = wire.scan_event(_encode(event, codec), codec)
    assert (meta.type, meta.status_code, meta.status_message) == (
        wire.TYPE_ERROR,
        410,
        "too old resource version",
    )


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("annotations", "end"), [({"k8s.io/initial-events-end": "true"}, True), ({}, False)])
def test_the_end_of_initial_events_is_recognised(codec: str, annotations: dict[str, str], end: bool) -> None:
    event = pb.WatchEvent(type=pb.WatchEvent.TYPE_BOOKMARK, resource_version="99")
    metadata: dict[str, object] = {"resourceVersion": "99"}
    if annotations:
        metadata["annotations"] = annotations
    event.resource.object.update({"kind": "ConfigMap", "metadata": metadata})
    assert wire.initial_events_end(_encode(event, codec), codec) is end


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"[1]", b'{"items": 3}', b"\x08"])
def test_unreadable_answers_are_wire_errors(codec: str, data: bytes) -> None:
    try:
        wire.scan_list(data, codec)
    except wire.WireError:
        return
    # Some inputs are valid in one codec (b"\x08" is field 1 varint 0 in protobuf: an empty answer).
    assert codec == CODEC_PROTO


def test_field_numbers_match_the_generated_descriptors() -> None:
    fields = pb.ListResponse.DESCRIPTOR.fields_by_name
    assert (fields["resource_version"].number, fields["continue"].number) == (
        wire.LIST_RESOURCE_VERSION,
        wire.LIST_CONTINUE,
    )
    assert (fields["remaining_item_count"].number, fields["items"].number) == (
        wire.LIST_REMAINING,
        wire.LIST_ITEMS,
    )
    event = pb.WatchEvent.DESCRIPTOR.fields_by_name
    assert (event["type"].number, event["resource_version"].number) == (
        wire.EVENT_TYPE,
        wire.EVENT_RESOURCE_VERSION,
    )
    assert MultiListResponse.DESCRIPTOR.fields_by_name["lists"].number == wire.RESPONSE_LISTS
    assert ClusterList.DESCRIPTOR.fields_by_name["list"].number == wire.CLUSTER_PAYLOAD
    assert ClusterEvent.DESCRIPTOR.fields_by_name["event"].number == wire.CLUSTER_PAYLOAD
    assert MultiWatchResponse.DESCRIPTOR.fields_by_name["event"].number == wire.WATCH_RESPONSE_EVENT


def test_a_list_written_in_another_field_order_is_read_the_same() -> None:
    """Agents write fields 1-3 before the items (the fast path); any other order is still read."""
    items = _list_response("", "", 0, [{"a": 1}, {"b": 2}, {"c": 3}]).SerializeToString()
    header = _list_response("42", "next", 7, []).SerializeToString()
    for data in (items + header, header + items, items + header + items):
        meta = wire.scan_list(data, CODEC_PROTO)
        decoded = pb.ListResponse.FromString(data)
        assert meta == wire.ListMeta("42", "next", 7, len(decoded.items))
