"""The fan-out's own errors: additions to the hub's tree (:mod:`otterscale.hub._errors`).

::

    HubError
     +-- InvalidFanoutRequestError   a bad query, selection, limit or option      (invalid_argument)
     +-- InvalidTokenError           a cursor or resume token that is not valid   (invalid_argument)
     +-- RequireAllError             require_all and some cluster was not OK      (failed_precondition)
     +-- LimitError
          +-- FanoutLimitError       a ``fanout.*`` limit was reached             (resource_exhausted)

Everything that happens inside one cluster is a ``ClusterStatus``, never one of these: only what
is wrong with the call itself fails it (fanout.md 2.11).
"""

from __future__ import annotations

import logging
from typing import ClassVar

from .._errors import HubError, LimitError

logger = logging.getLogger(__name__)

#: The one message of every refused cursor or resume token, whatever is wrong with it: telling
#: "tampered" from "issued to someone else" would tell an attacker that a stolen token is genuine.
REFUSED_MESSAGE = (
    "the {what} is not valid for this request: it is malformed, was changed, was issued to another "
    "caller or for another query, or the hub's token key changed; start again without it"
)


class InvalidFanoutRequestError(HubError):
    """A MultiList or MultiWatch request field is invalid; the message names the field."""

    connect_code: ClassVar[str] = "invalid_argument"


class InvalidTokenError(HubError):
    """A cursor or resume token cannot be used for this caller and request."""

    connect_code: ClassVar[str] = "invalid_argument"


class RequireAllError(HubError):
    """``require_all`` was set and some cluster did not answer OK."""

    connect_code: ClassVar[str] = "failed_precondition"


class FanoutLimitError(LimitError):
    """A ``fanout.*`` limit of ``otterscale.yaml`` was reached; the message names the key."""
