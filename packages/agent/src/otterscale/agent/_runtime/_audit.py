"""The audit trail of runtime sessions: one record when a session starts, one when it ends.

Who (subject), where (cluster, namespace, pod, container), what (argv as ``runtime.audit_argv``
allows, tty, port), how long, how many bytes each way, and how it ended (exit code, or the
Connect code of the error). Never stdin, never output, never the session id (only its short
hash, the same one the agent's other log lines use), never a token.

Every record goes through :func:`audit`, so moving to the shared audit module of
``otterscale-common`` is a change of this one function.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["AUDIT_LOGGER", "audit"]

#: The logger the records are written to, at INFO: ``extra`` fields become JSON keys with
#: ``--log-format json``.
AUDIT_LOGGER = "otterscale.audit"
_audit_logger = logging.getLogger(AUDIT_LOGGER)


def audit(event: str, **fields: Any) -> None:
    """Write one audit record ``event`` (e.g. ``runtime.session.start``) with ``fields``."""
    _audit_logger.info(event, extra={"audit_event": event, **fields})
