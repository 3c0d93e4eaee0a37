"""Who is calling: the verified identity the hub forwards and the agent impersonates.

The hub builds an :class:`Identity` from a verified OIDC token; the agent rebuilds it from signed
headers and acts in Kubernetes as that user (``Impersonate-User`` / ``Impersonate-Group``). Both
paths go through the one rule here, :func:`identity_name_problem`, so a name that Kubernetes could
read as one it reserves for itself, or that a person could not tell apart from another, can never
become an identity.

Why the rule is strict: the name travels to kube-apiserver in an HTTP header, and Go's HTTP stack
trims spaces and tabs around header values. ``" system:masters"`` (leading space) once passed a
check that looked for ``system:`` on the raw value, and kube-apiserver then impersonated
``system:masters``; ``"alice "`` became ``alice``. So a name is refused when it:

- starts or ends with whitespace (of any kind);
- contains any Unicode separator (category Z*: spaces, including U+0020, no-break and ideographic
  spaces, line and paragraph separators), any format character (Cf: zero-width space, joiners,
  bidirectional overrides such as RLO, the BOM), any control character (Cc: tab, newline, NUL...),
  a surrogate (Cs) or an unassigned code point (Cn, which a later Unicode version may make a
  format character);
- would start with a reserved prefix (``system:``) as kube-apiserver reads it: after the trimming
  Go does, and, as defence in depth, also in any letter case or compatibility form
  (``SYSTEM:``, or ``system:`` in full-width letters), which no legitimate caller needs.

The refusal says which rule was broken, never the value: it comes from a token or a header and may
be hostile.
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

#: What Go's net/textproto (``TrimString``) strips from both ends of a header value.
_GO_TRIMMED = " \t\r\n"

# Unicode categories refused anywhere in a name, with what the refusal calls them.
_REFUSED_CATEGORIES = {
    "Zs": "a space",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Cf": "an invisible format character",
    "Cc": "a control character",
    "Cs": "a surrogate",
    "Cn": "an unassigned character",
}


def kubernetes_view(value: str) -> str:
    """``value`` as kube-apiserver reads it from a header: Go trims spaces, tabs, CR and LF."""
    return value.strip(_GO_TRIMMED)


def reserved_prefix(value: str) -> str | None:
    """The reserved prefix ``value`` would carry as Kubernetes reads it (or in any case or width)."""
    seen = kubernetes_view(value)
    folded = unicodedata.normalize("NFKC", seen).casefold()
    for prefix in RESERVED_PREFIXES:
        if seen.startswith(prefix) or folded.startswith(prefix):
            return prefix
    return None


def identity_name_problem(value: object, what: str) -> str | None:
    """Say why ``value`` cannot be a subject or group name, or return None when it can.

    ``what`` names the value in the message ("subject", "a group in token claim 'groups'"). The
    value itself is never repeated. See the module docstring for the rule.
    """
    if not isinstance(value, str):
        return f"{what} must be a string"
    if not value:
        return f"{what} must not be empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"{what} is longer than {MAX_NAME_LENGTH} characters"
    prefix = reserved_prefix(value)
    if prefix is not None:
        return f"{what} uses the reserved prefix {prefix!r} (as Kubernetes reads it)"
    if value[0].isspace() or value[-1].isspace():
        return f"{what} has leading or trailing whitespace"
    for char in value:
        kind = _REFUSED_CATEGORIES.get(unicodedata.category(char))
        if kind is not None:
            return f"{what} contains {kind} (U+{ord(char):04X}), which is not allowed in a name"
    return None


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller: the Kubernetes user name and groups the agent impersonates.

    Construction validates every name with :func:`identity_name_problem`, and the groups: a tuple
    of at most :data:`MAX_GROUPS`, without duplicates. Invalid input raises ``ValueError``;
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
