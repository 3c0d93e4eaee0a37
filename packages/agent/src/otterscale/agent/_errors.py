"""The agent's exception tree and its one translation to Connect errors.

Everything the agent raises on purpose is an :class:`AgentError` whose subclass fixes the Connect
code; Kubernetes failures become :class:`KubernetesAPIError` carrying the Status object. The
service's error boundary (``_service.ErrorBoundary``) calls :func:`to_connect_error` exactly once
per failed call, so a handler never builds a ``ConnectError`` itself.

Tree::

    AgentError                      (code)
    +-- InvalidRequestError         invalid_argument: a request field is missing or malformed
    |   +-- ManifestError           invalid_argument: manifest is not one YAML/JSON object
    +-- UnknownClusterError         not_found: request names a cluster this agent does not serve
    +-- UnknownResourceError        not_found: group/version/resource not served by the cluster
    +-- UnknownKindError            not_found: Schema of a kind the cluster does not know
    +-- UnauthenticatedError        unauthenticated: no valid hub signature
    +-- KubernetesAPIError          mapped from the Status reason (see status_code)
    +-- KubernetesUnavailableError  unavailable: kube-apiserver unreachable or connection lost
    +-- KubernetesTimeoutError      deadline_exceeded: kube-apiserver did not answer in time
    +-- WatchClosedError            unavailable: the upstream watch ended; resume from last RV
    +-- ShuttingDownError           unavailable: the agent is stopping
    +-- PermissionDeniedError       permission_denied: an access review said no (exec, port-forward)
    +-- PreconditionError           failed_precondition: the object or session is not in a state
    |                               that allows the call (paused Deployment, no TTY, stdin closed)
    +-- SessionNotFoundError        not_found: unknown, ended or foreign session (one message for all)
    +-- SessionLimitError           resource_exhausted: a session, write or pending-input limit
    +-- SessionExpiredError         deadline_exceeded: a session's idle timeout or lifetime ran out
    +-- InputGapError               aborted: a write after a gap whose bytes never came
    +-- StreamUnavailableError      unavailable: an exec or port-forward stream could not be used

Messages are written for the caller: they never contain a stack trace, a token or a password.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

logger = logging.getLogger(__name__)

__all__ = [
    "AgentError",
    "InputGapError",
    "InvalidRequestError",
    "KubernetesAPIError",
    "KubernetesTimeoutError",
    "KubernetesUnavailableError",
    "ManifestError",
    "PermissionDeniedError",
    "PreconditionError",
    "SessionExpiredError",
    "SessionLimitError",
    "SessionNotFoundError",
    "ShuttingDownError",
    "StreamUnavailableError",
    "UnauthenticatedError",
    "UnknownClusterError",
    "UnknownKindError",
    "UnknownResourceError",
    "WatchClosedError",
    "status_code",
    "to_connect_error",
]


class AgentError(Exception):
    """Base of every error the agent raises on purpose; ``code`` is what the caller sees."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(AgentError):
    """A request field is missing or malformed (checked before anything reaches Kubernetes)."""

    code = Code.INVALID_ARGUMENT


class ManifestError(InvalidRequestError):
    """The manifest is not exactly one YAML or JSON object with ``apiVersion`` and ``kind``."""


class UnknownClusterError(AgentError):
    """The request names a cluster other than the one this agent serves."""

    code = Code.NOT_FOUND


class UnknownResourceError(AgentError):
    """The cluster does not serve the requested group/version/resource."""

    code = Code.NOT_FOUND


class UnknownKindError(AgentError):
    """Schema was asked for a kind the cluster's OpenAPI document does not describe."""

    code = Code.NOT_FOUND


class UnauthenticatedError(AgentError):
    """The call carries no valid hub identity signature."""

    code = Code.UNAUTHENTICATED


class KubernetesUnavailableError(AgentError):
    """kube-apiserver could not be reached, or the connection broke mid-call."""

    code = Code.UNAVAILABLE


class KubernetesTimeoutError(AgentError):
    """kube-apiserver did not answer within the call's deadline."""

    code = Code.DEADLINE_EXCEEDED


class WatchClosedError(AgentError):
    """The upstream watch ended; the client resumes from the last resourceVersion it saw."""

    code = Code.UNAVAILABLE


class ShuttingDownError(AgentError):
    """The agent is stopping; the client retries (through another connection) later."""

    code = Code.UNAVAILABLE


class PermissionDeniedError(AgentError):
    """Kubernetes said the caller may not do this (a SelfSubjectAccessReview was denied)."""

    code = Code.PERMISSION_DENIED


class PreconditionError(AgentError):
    """The object or session is not in a state that allows the call."""

    code = Code.FAILED_PRECONDITION


class SessionNotFoundError(AgentError):
    """No session with this id for this caller: unknown, ended, or someone else's (never says which).

    The message is always the same and never contains the id (ids must not leak into logs or
    screenshots of error messages).
    """

    code = Code.NOT_FOUND
    MESSAGE = "session not found: it ended, or this caller did not start it in this cluster"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class SessionLimitError(AgentError):
    """A session limit (per subject or per agent), the write size or the pending input is exceeded."""

    code = Code.RESOURCE_EXHAUSTED


class SessionExpiredError(AgentError):
    """A session's idle timeout or maximum lifetime ran out (the message names the key)."""

    code = Code.DEADLINE_EXCEEDED


class InputGapError(AgentError):
    """A write waited for missing earlier bytes that never arrived."""

    code = Code.ABORTED


class StreamUnavailableError(AgentError):
    """An exec or port-forward stream could not be opened or broke (the message says why)."""

    code = Code.UNAVAILABLE


# Kubernetes metav1.StatusReason -> Connect code, as api.md specifies.
_REASON_CODES: Mapping[str, Code] = {
    "Unauthorized": Code.UNAUTHENTICATED,
    "Forbidden": Code.PERMISSION_DENIED,
    "NotFound": Code.NOT_FOUND,
    "AlreadyExists": Code.ALREADY_EXISTS,
    "Conflict": Code.FAILED_PRECONDITION,
    "Gone": Code.NOT_FOUND,
    "Invalid": Code.INVALID_ARGUMENT,
    "BadRequest": Code.INVALID_ARGUMENT,
    "ServerTimeout": Code.DEADLINE_EXCEEDED,
    "Timeout": Code.DEADLINE_EXCEEDED,
    "TooManyRequests": Code.RESOURCE_EXHAUSTED,
    "RequestEntityTooLarge": Code.RESOURCE_EXHAUSTED,
    "MethodNotAllowed": Code.UNIMPLEMENTED,
    "NotAcceptable": Code.INVALID_ARGUMENT,
    "UnsupportedMediaType": Code.INVALID_ARGUMENT,
    "Expired": Code.INVALID_ARGUMENT,
    "ServiceUnavailable": Code.UNAVAILABLE,
    "InternalError": Code.INTERNAL,
    "StoreReadError": Code.INTERNAL,
}

# Used only when a response carries no reason at all (a proxy's plain-text error, an empty
# Status): the HTTP status is then the best evidence of what went wrong.
_HTTP_CODES: Mapping[int, Code] = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    405: Code.UNIMPLEMENTED,
    406: Code.INVALID_ARGUMENT,
    409: Code.FAILED_PRECONDITION,
    410: Code.NOT_FOUND,
    413: Code.RESOURCE_EXHAUSTED,
    414: Code.INVALID_ARGUMENT,  # URI too long: a huge selector
    415: Code.INVALID_ARGUMENT,
    422: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    431: Code.INVALID_ARGUMENT,  # header fields too large: a huge selector in the query
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}


def status_code(reason: str, http_status: int) -> Code:
    """The Connect code for a Kubernetes Status ``reason`` (api.md's table).

    A known reason decides; an unknown non-empty reason is Internal (as api.md says). An empty
    reason falls back to the HTTP status, because kube-apiserver and proxies in front of it do
    send reason-less failures (for example a bare 404 for an unknown path) whose meaning is
    still clear.
    """
    if reason:
        return _REASON_CODES.get(reason, Code.INTERNAL)
    return _HTTP_CODES.get(http_status, Code.INTERNAL)


class KubernetesAPIError(AgentError):
    """kube-apiserver answered with a failure Status; the code follows the Status reason."""

    def __init__(self, http_status: int, status: Mapping[str, Any] | None, fallback_text: str = "") -> None:
        self.http_status = http_status
        self.status: dict[str, Any] = dict(status) if status else {}
        self.reason = str(self.status.get("reason") or "")
        message = str(self.status.get("message") or "").strip()
        if not message:
            message = fallback_text.strip()[:500] or f"kubernetes API returned HTTP {http_status}"
        super().__init__(message)
        self.code = status_code(self.reason, http_status)


def to_connect_error(exc: BaseException) -> ConnectError:
    """Translate any exception from a handler into the ConnectError the client sees.

    A ConnectError passes through; an AgentError keeps its code and message; anything else is a
    bug, logged here with its traceback and reported as a bare Internal error so no internals
    leak to the client.
    """
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, AgentError):
        return ConnectError(exc.code, exc.message)
    logger.error("unexpected error in an agent call", exc_info=exc)
    return ConnectError(Code.INTERNAL, "internal error in the otterscale agent (details are in its log)")
