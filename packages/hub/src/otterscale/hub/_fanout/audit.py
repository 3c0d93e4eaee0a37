"""One audit record per fan-out call (MultiList page, MultiWatch open and close).

Until the project's audit trail (a structured audit module in otterscale.common) exists, the
record is one structured log line on the ``otterscale.hub.audit`` logger; this function is the
one place to switch over. A record carries the request id (also sent to every cluster's agent
with its leg, so the call can be joined across the hub's and the agents' logs), the caller, the
query and, per cluster, the outcome, item count and latency. Never object content, tokens,
cursors or continue tokens.
"""

from __future__ import annotations

import logging
from typing import Any

from otterscale.common import Identity

from .._observe import current_call

logger = logging.getLogger("otterscale.hub.audit")


def record(rpc: str, identity: Identity, **fields: Any) -> None:
    """Write the audit record of one fan-out call (``fields`` must hold no secret)."""
    call = current_call()
    logger.info(
        "fan-out %s",
        rpc,
        extra={
            "audit": {
                "rpc": rpc,
                "request_id": call.request_id if call is not None else "",
                "subject": identity.subject,
                "groups": list(identity.groups),
                **fields,
            }
        },
    )
