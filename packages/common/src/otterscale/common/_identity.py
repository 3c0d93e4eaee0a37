"""Who is calling: the verified identity the hub forwards and the agent impersonates.

The hub builds an :class:`Identity` from a verified OIDC token; the agent rebuilds it from signed
headers and acts in Kubernetes as that user (``Impersonate-User`` / ``Impersonate-Group``). Both
paths go through the same checks here, so a name that Kubernetes reserves for itself (``system:``)
or that cannot travel in an HTTP header can never become an identity.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Prefixes Kubernetes reserves for its own users and groups (``system:masters``,
#: ``system:serviceaccount:...``). An end user must never be able to impersonate them.
RESERVED_PREFIXES: tuple[str, ...] = ("system:",)

#: Longest subject or group name accepted, in characters.
MAX_NAME_LENGTH = 1024
#: Most groups one identity may carry: every group becomes a header on the way to Kubernetes.
MAX_GROUPS = 256

# Control characters, surrogates and line/paragraph separators: they break HTTP headers and logs.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def identity_name_problem(value: object, what: str) -> str | None:
    """Say why ``value`` cannot be a subject or group name, or return None when it can.

    ``what`` names the value in the message ("subject", "group"). The value itself is not
    repeated: it comes from a token or a header and may be hostile.
    """
    if not isinstance(value, str):
        return f"{what} must be a string"
    if not value:
        return f"{what} must not be empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"{what} is longer than {MAX_NAME_LENGTH} characters"
    for prefix in RESERVED_PREFIXES:
        if value.startswith(prefix):
            return f"{what} uses the reserved prefix {prefix!r}"
    if any(unicodedata.category(char) in _FORBIDDEN_CATEGORIES for char in value):
        return f"{what} contains control characters"
    return None


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller: the Kubernetes user name and groups the agent impersonates.

    Construction validates: a non-empty subject, string groups without duplicates, nothing with a
    reserved prefix (``system:``), no control characters. Invalid input raises ``ValueError``;
    callers turn it into the authentication error that fits their boundary.
    """

    subject: str
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = identity_name_problem(self.subject, "subject")
        if problem:
            raise ValueError(problem)
        if not isinstance(self.groups, tuple):
            raise ValueError("groups must be a tuple of strings")
        if len(self.groups) > MAX_GROUPS:
            raise ValueError(f"more than {MAX_GROUPS} groups")
        for group in self.groups:
            problem = identity_name_problem(group, "group")
            if problem:
                raise ValueError(problem)
        if len(set(self.groups)) != len(self.groups):
            raise ValueError("groups contain duplicates")
