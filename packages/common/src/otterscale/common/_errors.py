"""The exception tree of otterscale-common.

Every error this package raises on purpose derives from :class:`OtterscaleError`, so a service can
translate them at its boundary in one place. Each class names the Connect code it stands for in
``connect_code`` (a lower-case Connect code name such as ``"unauthenticated"``), which the services
turn into their ``Code`` value at their boundary: these errors are raised far from any request
(only the request plumbing, :mod:`._hosting`, raises a ``ConnectError`` itself).

::

    OtterscaleError
     +-- ConfigError                       invalid otterscale.yaml          (failed_precondition)
     +-- UsageError (also ValueError)      bad command-line input           (invalid_argument)
     +-- AuthenticationError               bad bearer token                 (unauthenticated)
     |    +-- IdentityHeaderError          bad hub-to-agent identity header (unauthenticated)
     +-- IdentityProviderUnavailableError  discovery/JWKS unreachable       (unavailable)

Messages are written for the person who has to fix the problem. They never contain a secret: no
token, password, key seed or signature, only names, paths, URLs and reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import ClassVar

logger = logging.getLogger(__name__)


class OtterscaleError(Exception):
    """Base class of every error otterscale-common raises on purpose."""

    connect_code: ClassVar[str] = "internal"


class ConfigError(OtterscaleError):
    """The configuration file is missing, unreadable or invalid.

    ``source`` names the file (or whatever the text came from); ``problems`` holds one
    ``(dotted.key.path, reason)`` pair per problem (the path is empty for problems with the whole
    file), and the message has one line per problem, ``<source>: <path>: <reason>``, so every line
    can be acted on alone.
    """

    connect_code: ClassVar[str] = "failed_precondition"

    def __init__(self, source: str, problems: Iterable[tuple[str, str]]) -> None:
        self.source = source
        self.problems: tuple[tuple[str, str], ...] = tuple(problems) or (("", "invalid configuration"),)
        lines = [
            f"{source}: {path}: {reason}" if path else f"{source}: {reason}" for path, reason in self.problems
        ]
        super().__init__("\n".join(lines))


class UsageError(OtterscaleError, ValueError):
    """A command-line value (such as ``--address``) is malformed.

    It is also a ``ValueError`` so that argparse ``type=`` callables may raise it.
    """

    connect_code: ClassVar[str] = "invalid_argument"


class AuthenticationError(OtterscaleError):
    """The caller's credentials are missing, malformed, expired or not trusted.

    The message says what is wrong with the credential without repeating it.
    """

    connect_code: ClassVar[str] = "unauthenticated"


class IdentityHeaderError(AuthenticationError):
    """The hub-to-agent identity headers are missing, malformed, stale or not signed correctly."""


class IdentityProviderUnavailableError(OtterscaleError):
    """The identity provider's discovery document or key set cannot be fetched or used.

    The message names the URL and the cause; the request may succeed later, so this maps to
    Unavailable rather than Unauthenticated.
    """

    connect_code: ClassVar[str] = "unavailable"


#: How many characters of a client-supplied value an error message or log line repeats.
ECHO_LIMIT = 80


def echo(value: str, limit: int = ECHO_LIMIT) -> str:
    """``value`` quoted for an error message or a log line, cut to ``limit`` characters.

    Messages that repeat what a client sent (a cluster, resource or object name) go to the
    client and into the access log: a 4 MiB name must not become a 4 MiB log line.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
