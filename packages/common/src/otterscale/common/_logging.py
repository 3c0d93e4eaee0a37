"""Process-wide logging set-up shared by the hub and the agent.

Two formats: ``text`` for people (``time level logger: message key=value ...``) and ``json`` for
log pipelines (one object per line with ``time``, ``level``, ``logger``, ``message``, every
``extra=`` field such as ``request_id``, ``method``, ``cluster``, ``subject``, ``code``,
``duration_ms``, and ``exception`` when there is one).

Every record passes through :class:`RedactingFilter` on the way out, which masks bearer tokens,
``Authorization`` values, JWT-looking strings and URL passwords in the message, the extra fields
and the exception text. It is a safety net: code must still never log secrets on purpose.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, Literal

logger = logging.getLogger(__name__)

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = ("text", "json")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")

REDACTED = "[REDACTED]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer x / "authorization": "Basic x" / authorization=x
    (
        re.compile(
            r"""(?i)(\b(?:proxy-)?authorization\b["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token|negotiate)\s+)?"""
            r"""[^\s"',;}\]]+"""
        ),
        r"\1" + REDACTED,
    ),
    # Bearer <token> anywhere else
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*"), r"\1" + REDACTED),
    # JWT / JWS compact serialisation: base64url JSON header ("eyJ") and at least one more part
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?"), REDACTED),
    # scheme://user:password@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@"), r"\1" + REDACTED + "@"),
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_HANDLER_MARK = "_otterscale_handler"


def redact(text: str) -> str:
    """Mask credentials that look like tokens, Authorization values or URL passwords in ``text``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record so that what any formatter prints has credentials masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):  # a broken format string: the handler reports it
            return True
        record.msg = redact(message)
        record.args = None
        for name, value in list(vars(record).items()):
            if name not in _STANDARD_ATTRIBUTES and isinstance(value, str):
                setattr(record, name, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {name: value for name, value in vars(record).items() if name not in _STANDARD_ATTRIBUTES}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in _extras(record).items():
            entry.setdefault(name, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2025-01-01T12:00:00.000Z INFO otterscale.hub: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{name}={_text_value(value)}" for name, value in extras.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: object) -> str:
    text = str(value)
    if not text or any(char.isspace() or char in '"=' for char in text):
        return json.dumps(text, ensure_ascii=False)
    return text


#: Third-party loggers kept at INFO or above even when the services run at DEBUG.
FRAME_LOGGERS = ("h2", "hpack", "hyperframe", "hypercorn.access", "priority")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the one at set-up):
    a command run inside a test process must not keep writing to a capture that was closed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def configure_logging(
    level: str | int = "info", fmt: LogFormat | str = "text", *, stream: IO[str] | None = None
) -> None:
    """Send all logging to ``stream`` (default: stderr) in ``fmt`` at ``level``, redacted.

    Replaces the handler a previous call installed and leaves other handlers (pytest's, for
    example) alone, so calling it twice is harmless.
    """
    if isinstance(level, str):
        if level.lower() not in LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
        numeric = logging.getLevelNamesMapping()[level.upper()]
    else:
        numeric = level
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(LOG_FORMATS)}")

    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    # The HTTP/2 libraries log every frame and header block at DEBUG (dozens of lines per request,
    # tripling the CPU per call); our own debug output stays readable without them.
    for name in FRAME_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.INFO))


class LogThrottle:
    """Lets one log line through per ``interval`` seconds and counts the ones it held back.

    For lines a client can cause at will (a rejected call, a refused request): a flood of them
    must not flood the log.
    """

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._held = 0

    def allow(self) -> bool:
        """Whether a line may go out now (else it is counted as held back)."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._held += 1
            return False
        self._last = now
        return True

    def held_back(self) -> str:
        """`` (N more like it in the last S s)`` for the line that goes out, or ``""``; resets."""
        held, self._held = self._held, 0
        return f" ({held} more like it held back)" if held else ""
