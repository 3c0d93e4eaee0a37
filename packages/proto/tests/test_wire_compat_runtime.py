"""Wire compatibility of RuntimeService with the original Go service (shared/design/runtime.md §1.2).

A dashboard written against the original calls ``otterscale.runtime.v1.RuntimeService`` with
the original's messages, so its field numbers and types are transcribed here by hand from the
design notes (independently of our .proto file), encoded with the hand-written encoder of
``_wire`` and decoded with the generated classes, message by message. The original was written in
protobuf edition 2023, where every singular field has explicit presence: its encoder writes an
explicitly set zero (``tail_lines = 0``), and the fields whose presence the original's handlers
honour must keep it here (``optional``).

Our additions take new numbers only; a message from an original client decodes with every
addition at its default.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from otterscale.runtime.v1 import runtime_pb2 as pb

from ._wire import Row, check_rows, f_bytes, f_str, f_varint, populated

PKG = "otterscale.runtime.v1"
S, B, I32, I64, U32, U64, BY, MSG = "string", "bool", "int32", "int64", "uint32", "uint64", "bytes", "message"
TIMESTAMP, EMPTY = "google.protobuf.Timestamp", "google.protobuf.Empty"


def _workload(*extra: Row) -> list[Row]:
    names = ("cluster", "group", "version", "resource", "namespace", "name")
    return [(n, i, S, False, None, n) for i, n in enumerate(names, start=1)] + list(extra)


# --- The original's messages, transcribed from runtime.md §1.2 ------------------------------------

ORIGINAL: dict[str, list[Row]] = {
    "PodLogRequest": [
        ("cluster", 1, S, False, None, "cluster"),
        ("namespace", 2, S, False, None, "namespace"),
        ("name", 3, S, False, None, "name"),
        ("container", 4, S, False, None, "container"),
        ("follow", 5, B, False, None, "follow"),
        ("tail_lines", 6, I64, False, None, "tailLines"),
        ("since_seconds", 7, I64, False, None, "sinceSeconds"),
        ("since_time", 8, MSG, False, TIMESTAMP, "sinceTime"),
        ("previous", 9, B, False, None, "previous"),
        ("timestamps", 10, B, False, None, "timestamps"),
        ("limit_bytes", 11, I64, False, None, "limitBytes"),
    ],
    "PodLogResponse": [("data", 1, BY, False, None, "data")],
    "ExecuteTTYRequest": [
        ("cluster", 1, S, False, None, "cluster"),
        ("namespace", 2, S, False, None, "namespace"),
        ("name", 3, S, False, None, "name"),
        ("container", 4, S, False, None, "container"),
        ("command", 5, S, True, None, "command"),
        ("tty", 6, B, False, None, "tty"),
        ("rows", 7, U32, False, None, "rows"),
        ("cols", 8, U32, False, None, "cols"),
    ],
    "ExecuteTTYResponse": [
        ("session_id", 1, S, False, None, "sessionId"),
        ("stdout", 2, BY, False, None, "stdout"),
        ("stderr", 3, BY, False, None, "stderr"),
    ],
    "WriteTTYRequest": [
        ("session_id", 1, S, False, None, "sessionId"),
        ("stdin", 2, BY, False, None, "stdin"),
    ],
    "ResizeTTYRequest": [
        ("session_id", 1, S, False, None, "sessionId"),
        ("rows", 2, U32, False, None, "rows"),
        ("cols", 3, U32, False, None, "cols"),
    ],
    "PortForwardRequest": [
        ("cluster", 1, S, False, None, "cluster"),
        ("namespace", 2, S, False, None, "namespace"),
        ("name", 3, S, False, None, "name"),
        ("port", 4, I32, False, None, "port"),
    ],
    "PortForwardResponse": [
        ("session_id", 1, S, False, None, "sessionId"),
        ("data", 2, BY, False, None, "data"),
    ],
    "WritePortForwardRequest": [
        ("session_id", 1, S, False, None, "sessionId"),
        ("data", 2, BY, False, None, "data"),
    ],
    "ScaleRequest": _workload(("replicas", 7, I32, False, None, "replicas")),
    "ScaleResponse": [("replicas", 1, I32, False, None, "replicas")],
    "RestartRequest": _workload(),
}

#: Our additions (runtime.md §5.2): new numbers only.
ADDITIONS: dict[str, list[Row]] = {
    "PodLogRequest": [("all_containers", 12, B, False, None, "allContainers")],
    "PodLogResponse": [("container", 2, S, False, None, "container")],
    "ExecuteTTYRequest": [("stdin", 9, B, False, None, "stdin")],
    "ExecuteTTYResponse": [
        ("exit_code", 4, I32, False, None, "exitCode"),
        ("message", 5, S, False, None, "message"),
    ],
    "WriteTTYRequest": [
        ("offset", 3, U64, False, None, "offset"),
        ("close_stdin", 4, B, False, None, "closeStdin"),
    ],
    "WritePortForwardRequest": [
        ("offset", 3, U64, False, None, "offset"),
        ("close_write", 4, B, False, None, "closeWrite"),
    ],
    "ScaleRequest": [("current_replicas", 8, I32, False, None, "currentReplicas")],
    "ScaleResponse": [
        ("previous_replicas", 2, I32, False, None, "previousReplicas"),
        ("status_replicas", 3, I32, False, None, "statusReplicas"),
        ("selector", 4, S, False, None, "selector"),
    ],
    "GetScaleRequest": _workload(),
    "ExecRequest": [
        ("start", 1, MSG, False, f"{PKG}.ExecuteTTYRequest", "start"),
        ("stdin", 2, BY, False, None, "stdin"),
        ("resize", 3, MSG, False, f"{PKG}.TerminalSize", "resize"),
        ("close_stdin", 4, B, False, None, "closeStdin"),
    ],
    "TerminalSize": [("rows", 1, U32, False, None, "rows"), ("cols", 2, U32, False, None, "cols")],
    "ExecResponse": [
        ("stdout", 1, BY, False, None, "stdout"),
        ("stderr", 2, BY, False, None, "stderr"),
        ("exit_code", 3, I32, False, None, "exitCode"),
        ("message", 4, S, False, None, "message"),
    ],
    "PortForwardStreamRequest": [
        ("start", 1, MSG, False, f"{PKG}.PortForwardRequest", "start"),
        ("data", 2, BY, False, None, "data"),
    ],
    "PortForwardStreamResponse": [("data", 1, BY, False, None, "data")],
}

#: Fields with explicit presence: the original's presence-honoured options (runtime.md §5.2),
#: the message-typed since_time, and the additions whose absence means something.
PRESENCE = {
    "PodLogRequest": {"tail_lines", "since_seconds", "since_time", "limit_bytes"},
    "ExecuteTTYRequest": {"rows", "cols", "stdin"},
    "ExecuteTTYResponse": {"exit_code"},
    "WriteTTYRequest": {"offset"},
    "WritePortForwardRequest": {"offset"},
    "ScaleRequest": {"current_replicas"},
    # Members of a oneof have presence by nature.
    "ExecRequest": {"start", "stdin", "resize", "close_stdin"},
    "ExecResponse": {"exit_code"},
    "PortForwardStreamRequest": {"start", "data"},
}

# RPC -> (request, response, server streaming, client streaming); the first eight are the original's.
RPCS = {
    "PodLog": (f"{PKG}.PodLogRequest", f"{PKG}.PodLogResponse", True, False),
    "ExecuteTTY": (f"{PKG}.ExecuteTTYRequest", f"{PKG}.ExecuteTTYResponse", True, False),
    "WriteTTY": (f"{PKG}.WriteTTYRequest", EMPTY, False, False),
    "ResizeTTY": (f"{PKG}.ResizeTTYRequest", EMPTY, False, False),
    "PortForward": (f"{PKG}.PortForwardRequest", f"{PKG}.PortForwardResponse", True, False),
    "WritePortForward": (f"{PKG}.WritePortForwardRequest", EMPTY, False, False),
    "Scale": (f"{PKG}.ScaleRequest", f"{PKG}.ScaleResponse", False, False),
    "Restart": (f"{PKG}.RestartRequest", EMPTY, False, False),
    "GetScale": (f"{PKG}.GetScaleRequest", f"{PKG}.ScaleResponse", False, False),
    "Exec": (f"{PKG}.ExecRequest", f"{PKG}.ExecResponse", True, True),
    "PortForwardStream": (f"{PKG}.PortForwardStreamRequest", f"{PKG}.PortForwardStreamResponse", True, True),
}

ALL_MESSAGES = sorted(set(ORIGINAL) | set(ADDITIONS))


def message_class(name: str) -> type[Message]:
    cls: type[Message] = getattr(pb, name)
    return cls


def _decode(cls: type[Message], data: bytes) -> Any:
    msg = cls()
    msg.ParseFromString(data)
    return msg


def f_timestamp(number: int, seconds: int, nanos: int = 0) -> bytes:
    """google.protobuf.Timestamp{seconds int64 = 1; nanos int32 = 2} as an embedded message."""
    return f_bytes(number, f_varint(1, seconds) + (f_varint(2, nanos) if nanos else b""))


# --- Descriptors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_original_fields(name: str) -> None:
    check_rows(message_class(name), PKG, ORIGINAL[name])


@pytest.mark.parametrize("name", sorted(ADDITIONS))
def test_addition_fields(name: str) -> None:
    check_rows(message_class(name), PKG, ADDITIONS[name])


@pytest.mark.parametrize("name", ALL_MESSAGES)
def test_no_untested_fields(name: str) -> None:
    """Every field is the original's or a listed addition, and no number is used twice."""
    expected = {row[0]: row[1] for row in ORIGINAL.get(name, []) + ADDITIONS.get(name, [])}
    assert {f.name: f.number for f in message_class(name).DESCRIPTOR.fields} == expected
    assert len(set(expected.values())) == len(expected)


def test_presence() -> None:
    for name in ALL_MESSAGES:
        for field in message_class(name).DESCRIPTOR.fields:
            explicit = field.name in PRESENCE.get(name, set())
            assert field.has_presence == explicit, f"{name}.{field.name}"


def test_service_rpcs() -> None:
    service = pb.DESCRIPTOR.services_by_name["RuntimeService"]
    assert service.full_name == f"{PKG}.RuntimeService"
    got = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming, m.client_streaming)
        for m in service.methods
    }
    assert got == RPCS


# --- Hand-encoded bytes from an original client decode with the generated classes -----------------


def test_pod_log_request() -> None:
    data = (
        f_str(1, "prod")
        + f_str(2, "default")
        + f_str(3, "web-0")
        + f_str(4, "app")
        + f_varint(5, 1)
        + f_varint(6, 100)
        + f_varint(7, 3600)
        + f_timestamp(8, 1_700_000_000, 500)
        + f_varint(9, 1)
        + f_varint(10, 1)
        + f_varint(11, 65536)
    )
    msg = _decode(pb.PodLogRequest, data)
    assert (msg.cluster, msg.namespace, msg.name, msg.container) == ("prod", "default", "web-0", "app")
    assert msg.follow is True
    assert (msg.tail_lines, msg.since_seconds, msg.limit_bytes) == (100, 3600, 65536)
    assert (msg.since_time.seconds, msg.since_time.nanos) == (1_700_000_000, 500)
    assert (msg.previous, msg.timestamps) == (True, True)
    assert msg.all_containers is False
    assert msg.SerializeToString() == data


def test_pod_log_request_presence() -> None:
    """An explicit zero (the original's edition-2023 encoder writes it) differs from absence."""
    base = f_str(1, "prod") + f_str(3, "p")
    absent = _decode(pb.PodLogRequest, base)
    for field in ("tail_lines", "since_seconds", "limit_bytes", "since_time"):
        assert not absent.HasField(field), field
    zeros = _decode(pb.PodLogRequest, base + f_varint(6, 0) + f_varint(7, 0) + f_varint(11, 0))
    for field in ("tail_lines", "since_seconds", "limit_bytes"):
        assert zeros.HasField(field), field
        assert getattr(zeros, field) == 0
    assert zeros.SerializeToString() == base + f_varint(6, 0) + f_varint(7, 0) + f_varint(11, 0)
    assert _decode(pb.PodLogRequest, base + f_timestamp(8, 0)).HasField("since_time")


def test_pod_log_response() -> None:
    chunk = b"line 1\nline 2\n\xff\x00binary"
    msg = _decode(pb.PodLogResponse, f_bytes(1, chunk))
    assert msg.data == chunk
    assert msg.container == ""
    assert _decode(pb.PodLogResponse, b"").data == b""  # a heartbeat: the original's clients append nothing


def test_execute_tty_request() -> None:
    data = (
        f_str(1, "prod")
        + f_str(2, "default")
        + f_str(3, "web-0")
        + f_str(4, "app")
        + f_str(5, "/bin/sh")
        + f_str(5, "-c")
        + f_str(5, "echo hi")
        + f_varint(6, 1)
        + f_varint(7, 40)
        + f_varint(8, 120)
    )
    msg = _decode(pb.ExecuteTTYRequest, data)
    assert (msg.cluster, msg.namespace, msg.name, msg.container) == ("prod", "default", "web-0", "app")
    assert list(msg.command) == ["/bin/sh", "-c", "echo hi"]
    assert msg.tty is True
    assert (msg.rows, msg.cols) == (40, 120)
    assert msg.HasField("rows")
    assert msg.HasField("cols")
    assert not msg.HasField("stdin")  # absent: stdin attached, as the original always did
    assert msg.SerializeToString() == data


def test_execute_tty_response() -> None:
    first = _decode(pb.ExecuteTTYResponse, f_str(1, "prod.AAAAAAAAAAAAAAAAAAAAAA"))
    assert first.session_id == "prod.AAAAAAAAAAAAAAAAAAAAAA"
    out = _decode(pb.ExecuteTTYResponse, f_bytes(2, b"\x1b[1mhi\r\n"))
    assert out.stdout == b"\x1b[1mhi\r\n"
    err = _decode(pb.ExecuteTTYResponse, f_bytes(3, b"oops\n"))
    assert (err.stdout, err.stderr) == (b"", b"oops\n")
    assert not err.HasField("exit_code")
    # Our last message, read by an original client, is just an empty output chunk.
    last = pb.ExecuteTTYResponse(exit_code=0).SerializeToString()
    assert last == f_varint(4, 0)
    failed = pb.ExecuteTTYResponse(exit_code=-1, message="command terminated").SerializeToString()
    assert failed == f_varint(4, -1) + f_str(5, "command terminated")


def test_write_tty_request() -> None:
    data = f_str(1, "prod.AAAAAAAAAAAAAAAAAAAAAA") + f_bytes(2, b"ls -l\r")
    msg = _decode(pb.WriteTTYRequest, data)
    assert (msg.session_id, msg.stdin) == ("prod.AAAAAAAAAAAAAAAAAAAAAA", b"ls -l\r")
    assert not msg.HasField("offset")  # an original client: arrival order
    assert msg.close_stdin is False
    assert msg.SerializeToString() == data
    ours = _decode(pb.WriteTTYRequest, data + f_varint(3, 0) + f_varint(4, 1))
    assert ours.HasField("offset")
    assert ours.offset == 0
    assert ours.close_stdin is True
    big = _decode(pb.WriteTTYRequest, f_varint(3, 2**63 + 5))
    assert big.offset == 2**63 + 5


def test_resize_tty_request() -> None:
    data = f_str(1, "prod.x") + f_varint(2, 50) + f_varint(3, 200)
    msg = _decode(pb.ResizeTTYRequest, data)
    assert (msg.session_id, msg.rows, msg.cols) == ("prod.x", 50, 200)
    assert msg.SerializeToString() == data
    # uint32: the original validates <= 65535 itself; the wire carries the full range.
    assert _decode(pb.ResizeTTYRequest, f_varint(2, 2**32 - 1)).rows == 2**32 - 1


def test_port_forward_messages() -> None:
    data = f_str(1, "prod") + f_str(2, "default") + f_str(3, "web-0") + f_varint(4, 8080)
    req = _decode(pb.PortForwardRequest, data)
    assert (req.cluster, req.namespace, req.name, req.port) == ("prod", "default", "web-0", 8080)
    assert req.SerializeToString() == data
    assert _decode(pb.PortForwardRequest, f_varint(4, -1)).port == -1  # int32, ten-byte negative

    resp = _decode(pb.PortForwardResponse, f_str(1, "prod.y") + f_bytes(2, b"HTTP/1.1 200 OK\r\n"))
    assert (resp.session_id, resp.data) == ("prod.y", b"HTTP/1.1 200 OK\r\n")

    write = _decode(pb.WritePortForwardRequest, f_str(1, "prod.y") + f_bytes(2, b"GET / HTTP/1.1\r\n\r\n"))
    assert (write.session_id, write.data) == ("prod.y", b"GET / HTTP/1.1\r\n\r\n")
    assert not write.HasField("offset")
    assert write.close_write is False
    closing = _decode(pb.WritePortForwardRequest, f_varint(3, 17) + f_varint(4, 1))
    assert (closing.offset, closing.close_write) == (17, True)


def test_scale_messages() -> None:
    data = (
        f_str(1, "prod")
        + f_str(2, "apps")
        + f_str(3, "v1")
        + f_str(4, "deployments")
        + f_str(5, "default")
        + f_str(6, "web")
        + f_varint(7, 3)
    )
    req = _decode(pb.ScaleRequest, data)
    assert (req.cluster, req.group, req.version, req.resource, req.namespace, req.name) == (
        "prod",
        "apps",
        "v1",
        "deployments",
        "default",
        "web",
    )
    assert req.replicas == 3
    assert not req.HasField("current_replicas")
    assert req.SerializeToString() == data
    assert _decode(pb.ScaleRequest, f_varint(7, -2)).replicas == -2  # refused by the agent, not the wire
    pre = _decode(pb.ScaleRequest, data + f_varint(8, 0))
    assert pre.HasField("current_replicas")
    assert pre.current_replicas == 0

    resp = _decode(pb.ScaleResponse, f_varint(1, 3))
    assert resp.replicas == 3
    ours = pb.ScaleResponse(replicas=3, previous_replicas=1, status_replicas=1, selector="app=web")
    encoded = ours.SerializeToString()
    assert encoded == f_varint(1, 3) + f_varint(2, 1) + f_varint(3, 1) + f_str(4, "app=web")
    assert _decode(pb.ScaleResponse, encoded).replicas == 3  # what an original client reads


def test_restart_and_get_scale_requests() -> None:
    data = (
        f_str(1, "prod")
        + f_str(2, "apps")
        + f_str(3, "v1")
        + f_str(4, "statefulsets")
        + f_str(5, "db")
        + f_str(6, "pg")
    )
    restart = _decode(pb.RestartRequest, data)
    assert (restart.cluster, restart.group, restart.version, restart.resource) == (
        "prod",
        "apps",
        "v1",
        "statefulsets",
    )
    assert (restart.namespace, restart.name) == ("db", "pg")
    assert restart.SerializeToString() == data
    # GetScale's request is the same fields 1-6, so a client can reuse one builder for both.
    assert _decode(pb.GetScaleRequest, data).SerializeToString() == data


# --- proto3 JSON (the Connect JSON codec) ---------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MESSAGES)
def test_json_names(name: str) -> None:
    cls = message_class(name)
    expected = {row[5] for row in ORIGINAL.get(name, []) + ADDITIONS.get(name, [])}
    if any(not oneof.name.startswith("_") for oneof in cls.DESCRIPTOR.oneofs):  # not proto3 optional's
        # One member of a oneof at a time: each alone must show under its JSON name.
        seen = set()
        values: dict[int, Any] = {FieldDescriptor.TYPE_BYTES: b"x", FieldDescriptor.TYPE_BOOL: True}
        for member in cls.DESCRIPTOR.fields:
            alone = cls()
            if member.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(alone, member.name).SetInParent()
            else:
                setattr(alone, member.name, values[member.type])
            seen |= set(json.loads(json_format.MessageToJson(alone)))
        assert seen == expected
        return
    got = json.loads(json_format.MessageToJson(populated(cls)))
    assert set(got) == expected


def test_json_of_an_original_dashboard() -> None:
    """Bodies as the original's web UI builds them: camelCase, int64 as strings, RFC 3339, base64."""
    log = json_format.Parse(
        json.dumps(
            {
                "cluster": "prod",
                "namespace": "default",
                "name": "web-0",
                "follow": True,
                "tailLines": "0",
                "sinceTime": "2026-01-02T03:04:05Z",
                "limitBytes": "1024",
            }
        ),
        pb.PodLogRequest(),
    )
    assert log.HasField("tail_lines")
    assert log.tail_lines == 0
    assert log.since_time.seconds == 1767323045
    assert log.limit_bytes == 1024
    assert not log.HasField("since_seconds")

    write = json_format.Parse(
        json.dumps({"sessionId": "prod.z", "stdin": base64.b64encode(b"\x03").decode()}), pb.WriteTTYRequest()
    )
    assert (write.session_id, write.stdin) == ("prod.z", b"\x03")
    first = json.loads(json_format.MessageToJson(pb.ExecuteTTYResponse(session_id="prod.z")))
    assert first == {"sessionId": "prod.z"}
    last = json.loads(json_format.MessageToJson(pb.ExecuteTTYResponse(exit_code=0)))
    assert last == {"exitCode": 0}  # presence: an exit code of 0 is sent
    heartbeat = json.loads(json_format.MessageToJson(pb.PodLogResponse()))
    assert heartbeat == {}
