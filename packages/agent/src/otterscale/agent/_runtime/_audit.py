"""The audit trail of runtime sessions: one event when a session starts, one when it ends.

Written to the agent's :class:`~otterscale.common.AuditLog` (the ``audit`` section of
otterscale.yaml: stdout by default, or a rotated file), the same trail and line format as the
hub's: who (subject, groups), where (cluster, namespace, pod, container), what (the RPC, argv as
``runtime.audit_argv`` allows, tty or port), how long, how many bytes each way, and how it ended
(the Connect code, the exit code). Never stdin, never output, never the session id (only the
short hash the agent's log lines use too), never a token.

The hub writes its own event for the ExecuteTTY or PortForward call (at its end); the writes and
resizes of a session are not audited one by one (they are part of the session).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence

from otterscale.common import AuditEvent, AuditLog, AuditSession, AuditTarget

from ._sessions import Session, SessionKind

logger = logging.getLogger(__name__)

__all__ = ["SessionAudit"]

SERVICE = "otterscale.runtime.v1.RuntimeService"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _argv(command: Sequence[str], policy: str) -> tuple[str, ...]:
    if policy == "none":
        return ()
    if policy == "command":
        return tuple(command[:1])
    return tuple(command)


class SessionAudit:
    """Writes the start and end events of sessions to ``log``."""

    def __init__(self, log: AuditLog, *, cluster: str, argv_policy: str) -> None:
        self._log = log
        self._cluster = cluster
        self._argv_policy = argv_policy

    def start(self, session: Session, *, verb: str, headers: Mapping[str, str]) -> None:
        logger.info(
            "%s session %s started in %s/%s", session.kind.value, session.ref, session.namespace, session.pod
        )
        self._write(session, verb, headers, phase="start", code="ok", exit_code=None)

    def end(
        self, session: Session, *, verb: str, headers: Mapping[str, str], code: str, exit_code: int | None
    ) -> None:
        logger.info("%s session %s ended: %s", session.kind.value, session.ref, code)
        self._write(session, verb, headers, phase="end", code=code, exit_code=exit_code)

    def _write(
        self,
        session: Session,
        verb: str,
        headers: Mapping[str, str],
        *,
        phase: str,
        code: str,
        exit_code: int | None,
    ) -> None:
        supplied = headers.get("x-request-id", "")
        exec_session = session.kind is SessionKind.EXEC
        self._log.write(
            AuditEvent(
                time=time.time(),
                component="agent",
                replica=self._cluster,
                request_id=supplied if _REQUEST_ID_RE.fullmatch(supplied) else "",
                subject=session.owner.subject,
                groups=session.groups,
                service=SERVICE,
                verb=verb,
                target=AuditTarget(cluster=self._cluster, namespace=session.namespace, name=session.pod),
                code=code,
                duration_ms=round((time.monotonic() - session.started) * 1000, 1) if phase == "end" else 0.0,
                source="",
                session=AuditSession(
                    session=session.ref,
                    phase="start" if phase == "start" else "end",
                    kind=session.kind.value,
                    container=session.container,
                    argv=_argv(session.command, self._argv_policy) if exec_session else (),
                    tty=session.tty,
                    port=session.port,
                    bytes_in=session.bytes_in,
                    bytes_out=session.bytes_out,
                    exit_code=exit_code,
                ),
            )
        )
