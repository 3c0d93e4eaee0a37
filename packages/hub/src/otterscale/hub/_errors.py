"""The hub's exception tree, and the one place errors become Connect errors.

::

    OtterscaleError (otterscale.common)
     +-- HubError
          +-- UnknownClusterError       the request names no configured cluster   (not_found)
          +-- MissingClusterError       the request's cluster field is empty       (invalid_argument)
          +-- MalformedRequestError     the request body cannot be read            (invalid_argument)
          +-- AgentUnavailableError     the cluster's agent is not connected       (unavailable)
          +-- ShuttingDownError         the hub is draining                        (unavailable)
          +-- LeaderUnavailableError    a follower cannot reach a leader right now (unavailable)
          +-- NotLeaderError            a forwarded call reached a replica that does not lead
                                        (unavailable: never forwarded a second time)
          +-- LimitError                a limit of :mod:`._limits` was reached     (resource_exhausted)
               +-- RequestTooLargeError      the request body is over max_request_bytes
               +-- ResponseTooLargeError     an agent's answer is over max_response_bytes
               +-- WatchLimitError           the subject holds max_watches_per_subject Watches
               +-- SlowWatchClientError      a Watch client accepted nothing for the send timeout

Errors from otterscale.common (``AuthenticationError`` -> unauthenticated,
``IdentityProviderUnavailableError`` -> unavailable, ...) carry their code the same way.
:func:`to_connect_error` turns any of them into a ``ConnectError``; anything else is a bug and
becomes ``internal`` with a request id to look up in the logs, never its text (connectrpc would
show a raw exception's text to the client).

Messages name clusters, ports and reasons; never a token, password or signature.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import OtterscaleError

logger = logging.getLogger(__name__)


class HubError(OtterscaleError):
    """Base class of the errors the hub raises on purpose."""


class UnknownClusterError(HubError):
    """The request's ``cluster`` is not configured in this hub."""

    connect_code: ClassVar[str] = "not_found"


class MissingClusterError(HubError):
    """The request's ``cluster`` field is empty."""

    connect_code: ClassVar[str] = "invalid_argument"


class MalformedRequestError(HubError):
    """The request message cannot be read far enough to find its cluster."""

    connect_code: ClassVar[str] = "invalid_argument"


class AgentUnavailableError(HubError):
    """The cluster is configured but its agent is not connected or does not answer."""

    connect_code: ClassVar[str] = "unavailable"


class ShuttingDownError(HubError):
    """The hub is shutting down and takes no new streams."""

    connect_code: ClassVar[str] = "unavailable"


class LeaderUnavailableError(HubError):
    """A follower has no leader to forward to right now (hand-over), or cannot reach it."""

    connect_code: ClassVar[str] = "unavailable"


class NotLeaderError(HubError):
    """A call that another replica already forwarded reached a replica that does not lead."""

    connect_code: ClassVar[str] = "unavailable"


class LimitError(HubError):
    """A limit on what the hub accepts from or holds for a client was reached (see ``_limits``)."""

    connect_code: ClassVar[str] = "resource_exhausted"


class RequestTooLargeError(LimitError):
    """The request body is larger than ``limits.max_request_bytes``."""


class ResponseTooLargeError(LimitError):
    """An agent's unary answer is larger than ``limits.max_response_bytes``."""


class WatchLimitError(LimitError):
    """The caller already holds ``limits.max_watches_per_subject`` Watch streams."""


class SlowWatchClientError(LimitError):
    """A Watch client accepted no event for ``limits.watch_send_timeout_seconds``."""


def to_connect_error(exc: BaseException, *, request_id: str | None = None) -> ConnectError:
    """The ``ConnectError`` a client sees for ``exc`` (ConnectErrors pass through unchanged)."""
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, OtterscaleError):
        try:
            code = Code(exc.connect_code)
        except ValueError:
            code = Code.INTERNAL
        return ConnectError(code, str(exc))
    suffix = f" (request id {request_id})" if request_id else ""
    return ConnectError(Code.INTERNAL, f"internal error in the hub{suffix}")
