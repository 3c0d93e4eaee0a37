"""The audit trail: one JSON line per audited call, written where ``audit:`` in otterscale.yaml says.

An audit event answers "who did what, where, and how did it end", for calls that change something
(Create, Apply, Delete, and every RPC that is not a known read) and, when ``audit.reads`` is
``metadata``, for reads too. Each line is one JSON object::

    {"time": "2026-12-01T10:00:00.123Z", "component": "hub", "replica": "hub-0",
     "request_id": "...", "subject": "...", "groups": ["..."], "cluster": "east",
     "service": "otterscale.resource.v1.ResourceService", "verb": "Create",
     "group": "", "version": "v1", "resource": "configmaps", "namespace": "team-a",
     "name": "settings", "dry_run": false, "code": "ok", "duration_ms": 12.5,
     "source": "10.0.0.7:51234", "forwarded_by": ""}

An agent writes one event when an exec or port-forward session starts and one when it ends
(``component: agent``), with the session's part inlined (:class:`AuditSession`: ``session`` (a
short hash, never the id), ``phase`` (``start`` or ``end``), ``kind``, ``container``, ``argv``,
``tty``, ``port``, ``bytes_in``, ``bytes_out``, ``exit_code``); never stdin or output.

``code`` is ``ok`` or the Connect code the caller saw (``permission_denied``,
``unauthenticated``...). A call that reaches many clusters at once (the hub's MultiList and
MultiWatch) adds ``"clusters"``: per cluster, how its leg ended (:class:`AuditClusterOutcome`), e.g.
``{"east": {"outcome": "ok", "items": 120, "duration_ms": 41.0, "reconnects": 0}, "west":
{"outcome": "unavailable", ...}}``; ``cluster`` is then empty. Other events have no such key.
An event never holds a manifest, a token, a signature, a password or an error message (which may
quote what the caller sent): only names and outcomes.

Where: ``stdout`` (default), a stream of its own, since the services log to stderr; or a file,
rotated by size. Writing goes through :mod:`logging`'s handlers (thread-safe, and the rotating
one renames files atomically), but never through the logging tree: audit lines are not log
records, and no log level or handler configured for the services' logs can drop or copy them.

Both services may write events; this module knows nothing about either.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ._config import AuditConfig

logger = logging.getLogger(__name__)

#: The level of an RPC for auditing: ``write`` is always audited, ``read`` only at ``metadata``.
AuditKind = Literal["write", "read"]


@dataclass(slots=True)
class AuditTarget:
    """What an audited call names (empty where its request has no such field)."""

    cluster: str = ""
    group: str = ""
    version: str = ""
    resource: str = ""
    namespace: str = ""
    name: str = ""
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class AuditSession:
    """An exec or port-forward session's part of an event (written by the agent)."""

    #: A short hash of the session id (the id itself is a capability and never written).
    session: str
    #: ``start`` or ``end``.
    phase: Literal["start", "end"]
    #: ``exec`` or ``port-forward``.
    kind: str
    container: str = ""
    #: The command, as much as ``runtime.audit_argv`` allows.
    argv: tuple[str, ...] = ()
    tty: bool = False
    port: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: The command's exit code, at the end of an exec that exited.
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class AuditClusterOutcome:
    """How one cluster's part of a multi-cluster call ended."""

    #: ``ok`` or what went wrong there, lower case (``unavailable``, ``timeout``,
    #: ``permission_denied``, ``unknown_cluster``...): names, never a message.
    outcome: str
    #: Objects listed, or events delivered for a watch.
    items: int = 0
    duration_ms: float = 0.0
    #: Times a watch leg had to be opened again.
    reconnects: int = 0


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited call (see the module docstring for the fields; ``target``'s are inlined)."""

    time: float
    component: str
    replica: str
    request_id: str
    subject: str
    groups: tuple[str, ...]
    service: str
    verb: str
    target: AuditTarget
    code: str
    duration_ms: float
    source: str
    forwarded_by: str = ""
    #: The session's part of an agent's session event; None for a call.
    session: AuditSession | None = None
    #: Per cluster, for a call that reaches many (empty otherwise, and then left out of the line).
    clusters: Mapping[str, AuditClusterOutcome] = field(default_factory=dict)

    def to_json(self) -> str:
        """The event as one line of JSON (no trailing newline), the target's (and a session's)
        fields inlined."""
        document = asdict(self)
        document.update(document.pop("target"))
        session = document.pop("session")
        if session is not None:
            session["argv"] = list(session["argv"])
            document.update(session)
        if not self.clusters:
            del document["clusters"]
        document["time"] = _timestamp(self.time)
        document["groups"] = list(self.groups)
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


class AuditLog:
    """Writes :class:`AuditEvent` lines to the configured sink. Close it when the service stops.

    ``reads`` says whether read calls are audited (:meth:`wants`). Build it with
    :meth:`from_config`; ``stream`` replaces stdout (tests).
    """

    def __init__(self, handler: logging.Handler, *, reads: bool) -> None:
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        self._reads = reads
        self._closed = False

    @classmethod
    def from_config(cls, config: AuditConfig, *, stream: IO[str] | None = None) -> AuditLog:
        """The audit log of the ``audit`` section; a file sink is opened now, so a path that
        cannot be written fails at start-up (``OSError``) rather than on the first write."""
        handler: logging.Handler
        if config.sink == "file":
            assert config.file is not None  # checked by AuditConfig
            handler = logging.handlers.RotatingFileHandler(
                config.file, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8"
            )
        else:
            handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
        return cls(handler, reads=config.reads == "metadata")

    def wants(self, kind: AuditKind) -> bool:
        """Whether a call of ``kind`` produces an event."""
        return kind == "write" or self._reads

    def write(self, event: AuditEvent) -> None:
        """Append one event (one line). A failing sink is reported on stderr by the handler."""
        if self._closed:
            return
        record = logging.makeLogRecord({"msg": event.to_json(), "levelno": logging.INFO, "levelname": "INFO"})
        self._handler.handle(record)

    def close(self) -> None:
        """Flush and close the sink (stdout itself stays open). Idempotent."""
        if not self._closed:
            self._closed = True
            self._handler.flush()
            if isinstance(self._handler, logging.FileHandler):
                self._handler.close()


def _timestamp(moment: float) -> str:
    when = datetime.fromtimestamp(moment, tz=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
