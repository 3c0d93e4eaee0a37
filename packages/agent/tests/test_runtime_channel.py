"""The WebSocket channel protocols of Kubernetes exec and port-forward, byte for byte.

Expected bytes are written from the protocol descriptions (KEP-4006 / KEP-3396 and the kubelet's
port-forward handler): a channel byte, then the payload; ``[255, n]`` closes stream n (v5);
resize is ``{"Width":cols,"Height":rows}`` on channel 4; a port-forward channel starts with the
port as two little-endian bytes; the error channel carries a metav1.Status.
"""

from __future__ import annotations

import json

import pytest

from otterscale.agent._runtime._channel import (
    CLOSE,
    ERROR,
    EXEC_PROTOCOLS,
    RESIZE,
    STDERR,
    STDIN,
    STDOUT,
    ProtocolError,
    close_message,
    exit_status,
    message,
    port_prefix,
    resize_message,
    split,
)


def test_channel_numbers_and_protocol_preference() -> None:
    assert (STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE) == (0, 1, 2, 3, 4, 255)
    assert EXEC_PROTOCOLS == ("v5.channel.k8s.io", "v4.channel.k8s.io")


def test_messages_are_a_channel_byte_and_the_payload() -> None:
    assert message(STDIN, b"ls\n") == b"\x00ls\n"
    assert message(STDIN, b"") == b"\x00"
    assert message(1, bytes(range(256)))[1:] == bytes(range(256))
    with pytest.raises(ValueError, match="not a byte"):
        message(256, b"x")


def test_close_is_255_then_the_stream() -> None:
    assert close_message(STDIN) == b"\xff\x00"


def test_resize_is_json_terminal_size_on_channel_4() -> None:
    data = resize_message(rows=40, cols=120)
    assert data[0] == 4
    assert json.loads(data[1:]) == {"Width": 120, "Height": 40}


def test_split() -> None:
    assert split(b"\x01hello") == (1, b"hello")
    assert split(b"\x02") == (2, b"")
    with pytest.raises(ProtocolError):
        split(b"")


def test_port_announcement_is_two_bytes_little_endian() -> None:
    port_prefix(b"\x90\x1f", 8080)  # 0x1f90
    port_prefix(b"\x50\x00", 80)
    with pytest.raises(ProtocolError, match="port 80, not 8080"):
        port_prefix(b"\x50\x00", 8080)
    with pytest.raises(ProtocolError, match="2-byte"):
        port_prefix(b"\x90", 8080)


def test_exit_status_success() -> None:
    status = exit_status(b'{"metadata":{},"status":"Success"}')
    assert (status.exit_code, status.message) == (0, "")


def test_exit_status_non_zero() -> None:
    payload = {
        "metadata": {},
        "status": "Failure",
        "message": "command terminated with non-zero exit code: error executing command [sh -c exit 3], "
        "exit code 3",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }
    status = exit_status(json.dumps(payload).encode())
    assert status.exit_code == 3
    assert "exit code 3" in status.message


def test_exit_status_failure_that_is_not_an_exit_code() -> None:
    payload = {
        "status": "Failure",
        "message": 'container not found ("nope")',
        "reason": "InternalError",
        "code": 500,
    }
    status = exit_status(json.dumps(payload).encode())
    assert status.exit_code is None
    assert (status.reason, status.http_code) == ("InternalError", 500)
    assert "container not found" in status.message


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"status":"Failure","reason":"NonZeroExitCode"}'])
def test_exit_status_garbage_is_a_failure_not_a_crash(payload: bytes) -> None:
    status = exit_status(payload)
    assert status.exit_code is None
    assert status.message
