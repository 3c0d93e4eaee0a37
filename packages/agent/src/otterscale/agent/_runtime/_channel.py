"""Kubernetes' WebSocket channel protocols for exec and port-forward, as bytes in and out.

Exec (``v5.channel.k8s.io``, else ``v4.channel.k8s.io``; KEP-4006, KEP-3396): every binary
message starts with one channel byte. Channels: 0 stdin, 1 stdout, 2 stderr, 3 error (one JSON
``metav1.Status`` when the command ends: ``Success``, or ``Failure`` with reason
``NonZeroExitCode`` and the exit code in ``details.causes[reason=ExitCode].message``), 4 resize
(JSON ``{"Width": cols, "Height": rows}``). v5 adds channel 255, "close": a message ``[255, n]``
half-closes stream ``n`` (stdin, so the command reads end of input); v4 has no way to do that.

Port-forward (the kubelet's WebSocket protocol, ``v4.channel.k8s.io`` framing): for the i-th
port of the request, channel 2i carries data both ways and 2i+1 the kubelet's error text. The
first message the server sends on each channel is the port number, 2 bytes little-endian,
before any data. There is no half-close.

Nothing here does I/O: the functions build and parse messages, so the framing is tested against
the protocol description alone (``tests/test_runtime_channel.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "CLOSE",
    "ERROR",
    "EXEC_PROTOCOLS",
    "EXEC_V4",
    "EXEC_V5",
    "PORT_FORWARD_PROTOCOLS",
    "RESIZE",
    "STDERR",
    "STDIN",
    "STDOUT",
    "ExitStatus",
    "ProtocolError",
    "close_message",
    "exit_status",
    "message",
    "port_prefix",
    "resize_message",
    "split",
]

EXEC_V5 = "v5.channel.k8s.io"
EXEC_V4 = "v4.channel.k8s.io"
#: In order of preference: the server picks the first it supports.
EXEC_PROTOCOLS = (EXEC_V5, EXEC_V4)
PORT_FORWARD_PROTOCOLS = (EXEC_V4,)

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE = 255


class ProtocolError(Exception):
    """The server sent something the protocol does not allow."""


def message(channel: int, data: bytes) -> bytes:
    """One message on ``channel``."""
    if not 0 <= channel <= 255:
        raise ValueError(f"channel {channel} is not a byte")
    return bytes((channel,)) + data


def close_message(channel: int) -> bytes:
    """v5's half-close of ``channel`` (stdin: the command sees end of input)."""
    return bytes((CLOSE, channel))


def resize_message(rows: int, cols: int) -> bytes:
    """A terminal resize; Kubernetes' TerminalSize is ``{"Width": cols, "Height": rows}``."""
    return message(RESIZE, json.dumps({"Width": cols, "Height": rows}, separators=(",", ":")).encode())


def split(data: bytes) -> tuple[int, bytes]:
    """``(channel, payload)`` of a received message."""
    if not data:
        raise ProtocolError("empty message (no channel byte)")
    return data[0], data[1:]


def port_prefix(payload: bytes, expected: int) -> None:
    """Check the first message of a port-forward channel: the port, 2 bytes little-endian."""
    if len(payload) != 2:
        raise ProtocolError(f"expected the 2-byte port number first, got {len(payload)} bytes")
    port = payload[0] | (payload[1] << 8)
    if port != expected:
        raise ProtocolError(f"the server answered for port {port}, not {expected}")


@dataclasses.dataclass(frozen=True, slots=True)
class ExitStatus:
    """What the error channel said: an exit code, or a failure that is not one."""

    #: The command's exit code; None when the Status reports another failure.
    exit_code: int | None
    #: Kubernetes' message (empty on success).
    message: str
    #: The Status reason of a failure that is not an exit code (e.g. ``InternalError``).
    reason: str = ""
    #: The Status' HTTP code of such a failure (0 when absent).
    http_code: int = 0


def exit_status(payload: bytes) -> ExitStatus:
    """Interpret the JSON Status of the error channel.

    ``Success`` is exit code 0. ``Failure`` with reason ``NonZeroExitCode`` carries the exit code
    in a cause with reason ``ExitCode``. Any other Status is a failure to run the command (the
    API server's stream translator reports kubelet errors this way, e.g. an unknown container).
    A payload that is not a Status is reported as such a failure with its text.
    """
    try:
        status: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        text = payload.decode("utf-8", "replace").strip()
        return ExitStatus(None, text[:1000] or "the exec stream reported an unreadable error")
    if not isinstance(status, dict):
        return ExitStatus(None, "the exec stream reported an unreadable error")
    text = str(status.get("message") or "").strip()
    if status.get("status") == "Success":
        return ExitStatus(0, "")
    reason = str(status.get("reason") or "")
    if reason == "NonZeroExitCode":
        details = status.get("details")
        causes = details.get("causes") if isinstance(details, dict) else None
        for cause in causes or ():
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                try:
                    return ExitStatus(int(str(cause.get("message"))), text)
                except ValueError:
                    break
    code = status.get("code")
    return ExitStatus(
        None, text or "the command could not be run", reason, code if isinstance(code, int) else 0
    )
