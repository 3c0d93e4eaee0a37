"""Routes read from descriptors, and the routing string read from raw requests (pure logic).

The requests are real protobuf encodings and JSON documents of the test-only EchoService; the
descriptors of the refused routes are built here, in the default pool, with the real
``(otterscale.routing.v1.route)`` option.
"""

from __future__ import annotations

import itertools

import pytest
from connectrpc.method import IdempotencyLevel, StreamType
from google.protobuf import descriptor_pb2, descriptor_pool, json_format

from otterscale.hub._codec import CODEC_JSON, CODEC_PROTO, RawMessage
from otterscale.hub._errors import MalformedRequestError
from otterscale.hub._routes import Route, RouteError, cluster_routes, hub_routes
from otterscale.resource.v1 import resource_pb2
from otterscale.routing.v1 import routing_pb2
from otterscale.testing import ECHO_SERVICE
from otterscale.testing.echo.v1 import echo_pb2 as pb

ROUTES = {route.method: route for route in cluster_routes(ECHO_SERVICE)}
_files = itertools.count()


def proto(message: object) -> RawMessage:
    return RawMessage(message.SerializeToString(), CODEC_PROTO)  # type: ignore[attr-defined]


def as_json(text: str) -> RawMessage:
    return RawMessage(text.encode(), CODEC_JSON)


def test_routes_follow_the_descriptor() -> None:
    shapes = {name: (route.info.stream_type, route.field, route.session) for name, route in ROUTES.items()}
    assert shapes == {
        "Say": (StreamType.UNARY, "cluster", False),
        "Count": (StreamType.SERVER_STREAM, "cluster", False),
        "Collect": (StreamType.CLIENT_STREAM, "start.cluster", False),
        "Chat": (StreamType.BIDI_STREAM, "start.cluster", False),
        "Write": (StreamType.UNARY, "session_id", True),
    }
    assert ROUTES["Chat"].procedure == "/otterscale.testing.echo.v1.EchoService/Chat"
    resource = {
        route.method: route
        for route in cluster_routes(resource_pb2.DESCRIPTOR.services_by_name["ResourceService"])
    }
    assert [name for name, route in resource.items() if route.resumable] == ["Watch"]
    assert resource["Watch"].again == "the Watch from the last resourceVersion"
    assert ROUTES["Chat"].again == "the Chat call"


def test_a_nested_field_in_a_oneof() -> None:
    chat = ROUTES["Chat"]
    first = pb.ChatRequest(start=pb.Start(cluster="alpha"))
    assert chat.cluster(proto(first)) == "alpha"
    assert chat.cluster(as_json(json_format.MessageToJson(first))) == "alpha"
    # Occurrences of a message field merge; the last cluster wins.
    merged = first.SerializeToString() + pb.ChatRequest(start=pb.Start(cluster="beta")).SerializeToString()
    assert chat.cluster(RawMessage(merged, CODEC_PROTO)) == "beta"
    assert pb.ChatRequest.FromString(merged).start.cluster == "beta"
    # A later member of the oneof clears `start`, as the agent's parser will decide too.
    replaced = first.SerializeToString() + pb.ChatRequest(text="x").SerializeToString()
    assert pb.ChatRequest.FromString(replaced).WhichOneof("kind") == "text"
    assert chat.cluster(RawMessage(replaced, CODEC_PROTO)) == ""
    again = replaced + first.SerializeToString()
    assert chat.cluster(RawMessage(again, CODEC_PROTO)) == "alpha"
    assert chat.cluster(proto(pb.ChatRequest(text="no start"))) == ""
    assert chat.cluster(as_json('{"start": null}')) == ""
    assert chat.cluster(as_json('{"text": "x"}')) == ""


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ('{"start": "alpha"}', "the request's start must be an object"),
        ('{"start": {"cluster": 1}}', "the request's start.cluster must be a string"),
        ('{"sessionId": "a", "session_id": "b"}', "the request sets sessionId and session_id; set one"),
    ],
)
def test_malformed_json_names_the_field(document: str, message: str) -> None:
    route = ROUTES["Write"] if "ession" in document else ROUTES["Chat"]
    with pytest.raises(MalformedRequestError) as caught:
        route.cluster(as_json(document))
    assert str(caught.value) == message


def test_a_truncated_nested_message_is_malformed() -> None:
    # `start` (5 bytes) holds a cluster that claims 9 bytes and has 3.
    with pytest.raises(MalformedRequestError):
        ROUTES["Chat"].cluster(RawMessage(b"\x0a\x05\x0a\x09alp", CODEC_PROTO))


@pytest.mark.parametrize("cluster", ["alpha", "a", "a-1", "x" * 63])
def test_a_session_id_routes_on_its_cluster(cluster: str) -> None:
    session = f"{cluster}.{'Ab0_-' * 4}Zz"
    assert ROUTES["Write"].cluster(proto(pb.WriteRequest(session_id=session))) == cluster
    assert ROUTES["Write"].cluster(as_json(f'{{"sessionId": "{session}"}}')) == cluster


@pytest.mark.parametrize(
    "session",
    [
        "",
        "alpha",
        "alpha.",
        f"{'x' * 64}.{'A' * 22}",
        f"alpha.{'A' * 21}=",
        f"alpha.{'A' * 22}.",
        "a_b." + "A" * 22,
    ],
)
def test_a_malformed_session_id_is_refused_without_echoing_it(session: str) -> None:
    with pytest.raises(MalformedRequestError) as caught:
        ROUTES["Write"].cluster(proto(pb.WriteRequest(session_id=session)))
    if session:
        assert session not in str(caught.value)


def test_hub_routes_have_no_cluster() -> None:
    from otterscale.cluster.v1 import cluster_pb2

    [route] = hub_routes(cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"])
    assert route.info.idempotency_level is IdempotencyLevel.NO_SIDE_EFFECTS
    with pytest.raises(RouteError):
        route.cluster(RawMessage(b"", CODEC_PROTO))


# --------------------------------------------------------------------------------------------------
# Refused at start-up


def service(
    index: int, fields: list[tuple[str, int, int, str]], route: routing_pb2.Route | None = None
) -> object:
    """A one-method service whose request has ``fields`` (name, number, type, type name); its
    package is ``routes.test<index>`` (``testN`` in a type name stands for it)."""
    fields = [(n, number, kind, name.replace("testN", f"test{index}")) for n, number, kind, name in fields]
    file = descriptor_pb2.FileDescriptorProto(
        name=f"routes_test_{index}.proto", package=f"routes.test{index}", syntax="proto3"
    )
    file.dependency.append("otterscale/routing/v1/routing.proto")
    file.message_type.add(name="Inner").field.add(
        name="cluster", number=1, type=9, label=1, json_name="cluster"
    )
    request = file.message_type.add(name="Request")
    for name, number, kind, type_name in fields:
        field = request.field.add(name=name, number=number, type=kind, label=1, json_name=name)
        if type_name:
            field.type_name = type_name
    method = file.service.add(name="Service").method.add(
        name="Call", input_type=f".routes.test{index}.Request", output_type=f".routes.test{index}.Request"
    )
    if route is not None:
        method.options.Extensions[routing_pb2.route].CopyFrom(route)
    descriptor_pool.Default().Add(file)
    return descriptor_pool.Default().FindServiceByName(f"routes.test{index}.Service")


STRING, MESSAGE = 9, 11


@pytest.mark.parametrize(
    ("fields", "route", "reason"),
    [
        ([("name", 1, STRING, "")], None, "has no `string cluster = 1`"),
        ([("cluster", 2, STRING, "")], None, "has no `string cluster = 1`"),
        ([("cluster", 1, MESSAGE, ".routes.testN.Inner")], None, "has no `string cluster = 1`"),
        ([("cluster", 1, STRING, "")], routing_pb2.Route(field="nope"), "has no field 'nope'"),
        (
            [("inner", 1, MESSAGE, ".routes.testN.Inner")],
            routing_pb2.Route(field="inner"),
            "must be a string",
        ),
        ([("name", 1, STRING, "")], routing_pb2.Route(field="name.cluster"), "must be a message"),
        (
            [("inner", 1, MESSAGE, ".routes.testN.Inner")],
            routing_pb2.Route(session="inner.cluster"),
            "the session id must be a top-level field",
        ),
        ([("name", 1, STRING, "")], routing_pb2.Route(), "sets neither field nor session"),
    ],
)
def test_a_method_that_cannot_be_routed_is_refused(
    fields: list[tuple[str, int, int, str]], route: routing_pb2.Route | None, reason: str
) -> None:
    index = next(_files)
    with pytest.raises(RouteError) as caught:
        cluster_routes(service(index, fields, route))
    assert str(caught.value).startswith(f"cannot route /routes.test{index}.Service/Call: ")
    assert reason in str(caught.value)


def test_the_default_route_is_field_one() -> None:
    [route] = cluster_routes(service(next(_files), [("cluster", 1, STRING, "")]))
    assert isinstance(route, Route)
    assert route.cluster(as_json('{"cluster": "alpha"}')) == "alpha"
