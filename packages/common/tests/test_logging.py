"""Logging set-up: JSON and text formats, extra fields, and redaction of credentials."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from otterscale.common import RedactingFilter, configure_logging, echo, redact

JWT = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYS0xIn0"
    ".eyJzdWIiOiJhbGljZSIsImF1ZCI6Im90dGVyc2NhbGUifQ"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmUtc2lnbmF0dXJlLWJ5dGVz"
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_json_format_has_one_object_per_line_with_extras(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    log = logging.getLogger("otterscale.hub.test")
    log.info(
        "call %s finished",
        "Get",
        extra={
            "request_id": "r-1",
            "method": "/otterscale.resource.v1.ResourceService/Get",
            "cluster": "dev",
            "subject": "alice",
            "code": "ok",
            "duration_ms": 12.5,
        },
    )
    log.debug("not shown at info")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "info"
    assert entry["logger"] == "otterscale.hub.test"
    assert entry["message"] == "call Get finished"
    assert entry["time"].endswith("Z")
    assert "T" in entry["time"]
    assert entry["request_id"] == "r-1"
    assert entry["method"] == "/otterscale.resource.v1.ResourceService/Get"
    assert (entry["cluster"], entry["subject"], entry["code"], entry["duration_ms"]) == (
        "dev",
        "alice",
        "ok",
        12.5,
    )


def test_json_format_includes_exceptions_and_odd_values(stream: io.StringIO) -> None:
    configure_logging("debug", "json", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed", extra={"path": object(), "text": "line\nbreak"})
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "error"
    assert "RuntimeError: boom" in entry["exception"]
    assert entry["path"].startswith("<object object")
    assert entry["text"] == "line\nbreak"


def test_text_format(stream: io.StringIO) -> None:
    configure_logging("warning", "text", stream=stream)
    logging.getLogger("otterscale.agent").warning(
        "tunnel down", extra={"cluster": "dev", "reason": "no route"}
    )
    logging.getLogger("otterscale.agent").info("hidden")
    line = stream.getvalue().rstrip("\n")
    assert ' WARNING otterscale.agent: tunnel down cluster=dev reason="no route"' in line
    assert "\n" not in line


def test_configure_logging_twice_replaces_its_own_handler(stream: io.StringIO) -> None:
    other = io.StringIO()
    configure_logging("info", "text", stream=other)
    configure_logging("info", "json", stream=stream)
    logging.getLogger("y").info("once")
    assert other.getvalue() == ""
    assert len(stream.getvalue().splitlines()) == 1


def test_levels_are_case_insensitive_and_numeric(stream: io.StringIO) -> None:
    configure_logging("DEBUG", "text", stream=stream)
    assert logging.getLogger().level == logging.DEBUG
    configure_logging(logging.ERROR, "text", stream=stream)
    assert logging.getLogger().level == logging.ERROR


def test_bad_level_or_format() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud", "text")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging("info", "xml")


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("headers={'authorization': 'Bearer tok123456', 'x': 1}", "tok123456"),
        ('{"Authorization": "Bearer tok123456"}', "tok123456"),
        ("Proxy-Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("sent bearer abcdefgh12345678", "abcdefgh12345678"),
        (f"token was {JWT} and more", JWT.split(".")[1]),
        (f"token={JWT}", JWT.split(".")[2]),
        ("dial https://agent:hunter2pass@hub.example.com/x", "hunter2pass"),
    ],
)
def test_redact(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert "[REDACTED]" in redacted


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "cluster dev: GET /apis/apps/v1 took 12ms (user alice@example.com, eye.candy)"
    assert redact(text) == text


def test_redaction_applies_to_messages_arguments_extras_and_exceptions(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    log = logging.getLogger("otterscale.leaky")
    log.info("header %s", f"Authorization: Bearer {JWT}", extra={"token": JWT})
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        log.exception("verification failed")
    output = stream.getvalue()
    for part in JWT.split("."):
        assert part not in output
    assert output.count("[REDACTED]") >= 3


def test_redaction_in_text_format(stream: io.StringIO) -> None:
    configure_logging("info", "text", stream=stream)
    logging.getLogger("z").info("got %r", {"authorization": f"Bearer {JWT}"})
    assert JWT.split(".")[2] not in stream.getvalue()


def test_filter_keeps_records_with_broken_format_strings() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s %s", ("only one",), None)
    assert RedactingFilter().filter(record) is True


def test_http2_frame_loggers_stay_quiet_at_debug() -> None:
    import io
    import logging

    from otterscale.common import configure_logging

    out = io.StringIO()
    configure_logging("debug", "text", stream=out)
    try:
        logging.getLogger("hpack.hpack").debug("Decoding header block")
        logging.getLogger("h2.connection").debug("Process input")
        logging.getLogger("otterscale.hub.test").debug("our own debug line")
        text = out.getvalue()
        assert "our own debug line" in text
        assert "Decoding header block" not in text
        assert "Process input" not in text
    finally:
        configure_logging("info", "text")


def test_echo_quotes_short_values_and_cuts_long_ones() -> None:
    assert echo("east") == "'east'"
    long = "x" * 10_000
    shown = echo(long)
    assert shown.startswith("'" + "x" * 80 + "'...")
    assert shown.endswith("(10000 characters)")
    assert len(shown) < 120
