"""Signed hub-to-agent identity headers.

The original agent trusted ``X-Otterscale-Subject`` blindly, so anything that could reach an agent
could act as anyone. The hub now signs what it forwards and the agent accepts only fresh, valid
signatures. Both sides already share one secret per cluster (the agent's tunnel password), so the
MAC key is derived from it; no new secret has to be distributed.

Headers (names are case-insensitive on the wire)::

    X-Otterscale-Subject:   <subject, percent-encoded>
    X-Otterscale-Groups:    <group>,<group>,...   each group percent-encoded; absent when no groups
    X-Otterscale-Timestamp: <unix seconds, decimal>
    X-Otterscale-Signature: v1=<base64url, unpadded, of HMAC-SHA256(key, message)>

Percent-encoding keeps ASCII letters, digits and ``-._~@:/+=`` as they are and encodes everything
else as ``%XX`` of the UTF-8 bytes, so a comma inside a group, a space or any Unicode survives the
trip, and plain subjects (UUIDs, e-mail addresses, user names) stay readable and backward
compatible with agents that read the subject header as text. The agent accepts only the canonical
encoding.

The MAC covers, as netstrings (``<byte length>:<utf-8 bytes>,``) so no two field lists share an
encoding: the label ``otterscale-identity-v1``, the cluster name, the full RPC procedure path
(``/otterscale.resource.v1.ResourceService/Get``), the timestamp, the subject, the number of
groups and each group. The cluster and method are not sent: the agent knows which cluster it is
and which procedure was called, so a signature for another cluster or another RPC fails.

Limits: a signature is accepted for ``max_skew_seconds`` (default 30 s) either side of the agent's
clock. Inside that window the same headers can be replayed for the same cluster and RPC (there is
no nonce and the request body is not covered); the headers only travel inside the tunnel, so this
bounds the damage of a leaked request rather than being the primary defence.

This module never logs or puts into an error message a key, a password or a signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, overload
from urllib.parse import quote, unquote

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import IdentityHeaderError
from ._identity import Identity

logger = logging.getLogger(__name__)

IDENTITY_HEADER_PREFIX = "x-otterscale-"
SUBJECT_HEADER = "X-Otterscale-Subject"
GROUPS_HEADER = "X-Otterscale-Groups"
TIMESTAMP_HEADER = "X-Otterscale-Timestamp"
SIGNATURE_HEADER = "X-Otterscale-Signature"

_LABEL = "otterscale-identity-v1"
_SIGNATURE_VERSION = "v1="
_HKDF_SALT = b"otterscale/identity-headers/v1"
_KEY_LENGTH = 32
_MIN_KEY_LENGTH = 16
_SAFE_CHARS = "@:/+="  # kept as they are, besides ASCII letters, digits and "-._~"
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_SIGNATURE_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, base64url without padding


def derive_identity_key(cluster: str, agent_password: str | bytes) -> bytes:
    """Derive the per-cluster key that signs identity headers from the agent's tunnel password.

    HKDF-SHA256 with a fixed salt and an info label that includes the cluster name, so each
    cluster gets its own key even if two clusters share a password, and the MAC key is never the
    password itself. HKDF does not stretch a weak password: use long random agent passwords.
    """
    if not cluster:
        raise ValueError("cluster must not be empty")
    secret = agent_password.encode("utf-8") if isinstance(agent_password, str) else agent_password
    if not secret:
        raise ValueError("agent password must not be empty")
    return _hkdf(secret, _HKDF_SALT, b"otterscale identity headers v1; cluster=" + cluster.encode("utf-8"))


def derive_key(secret: str | bytes, *, purpose: str) -> bytes:
    """A 32-byte key for ``purpose`` (a short label) from a shared ``secret`` (HKDF-SHA256).

    For MACs between parts that already share a secret, e.g. hub replicas (the tunnel key):
    each purpose gets its own key, and the secret itself is never used as a key.
    """
    data = secret.encode("utf-8") if isinstance(secret, str) else secret
    if not data or not purpose:
        raise ValueError("secret and purpose must not be empty")
    return _hkdf(data, b"otterscale/" + purpose.encode("utf-8"), purpose.encode("utf-8"))


def mac_fields(key: bytes, label: str, fields: Iterable[str]) -> str:
    """HMAC-SHA256 of ``label`` and ``fields`` as netstrings (no two field lists share an
    encoding), base64url without padding (43 characters). Compare with :func:`hmac.compare_digest`."""
    if not isinstance(key, bytes) or len(key) < _MIN_KEY_LENGTH:
        raise ValueError(f"key must be at least {_MIN_KEY_LENGTH} bytes")
    message = _netstring(label) + b"".join(_netstring(item) for item in fields)
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_LENGTH, salt=salt, info=info).derive(secret)


def sign_identity(
    identity: Identity, *, cluster: str, method: str, key: bytes, now: float | None = None
) -> dict[str, str]:
    """Return the headers that prove ``identity`` to the agent of ``cluster`` for one RPC.

    ``method`` is the full procedure path the hub is about to call on the agent. The result holds
    only ``X-Otterscale-*`` headers; drop any client-supplied ones first with
    :func:`strip_identity_headers`.
    """
    _check_arguments(key, cluster, method)
    timestamp = int(time.time() if now is None else now)
    headers = {
        SUBJECT_HEADER: _encode(identity.subject),
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: _SIGNATURE_VERSION
        + _mac(key, cluster=cluster, method=method, timestamp=timestamp, identity=identity),
    }
    if identity.groups:
        headers[GROUPS_HEADER] = ",".join(_encode(group) for group in identity.groups)
    return headers


def verify_identity(
    headers: Mapping[str, str],
    *,
    cluster: str,
    method: str,
    key: bytes,
    max_skew_seconds: float = 30.0,
    now: float | None = None,
) -> Identity:
    """Check the identity headers of one request to the agent of ``cluster`` and return the caller.

    Header names are looked up case-insensitively; a header given twice is refused. Raises
    :class:`IdentityHeaderError` naming the header and the reason (missing, malformed, bad
    signature, too old, in the future); the signature comparison is constant-time.
    """
    _check_arguments(key, cluster, method)
    found = _identity_headers(headers)

    raw_subject = _required(found, SUBJECT_HEADER)
    raw_timestamp = _required(found, TIMESTAMP_HEADER)
    raw_signature = _required(found, SIGNATURE_HEADER)
    raw_groups = found.get(GROUPS_HEADER.lower(), "")

    if not _TIMESTAMP_RE.fullmatch(raw_timestamp):
        raise IdentityHeaderError(f"{TIMESTAMP_HEADER} is malformed: expected unix seconds")
    timestamp = int(raw_timestamp)
    if not raw_signature.startswith(_SIGNATURE_VERSION):
        raise IdentityHeaderError(f"{SIGNATURE_HEADER} is malformed: expected a 'v1=' signature")
    if not _SIGNATURE_RE.fullmatch(raw_signature[len(_SIGNATURE_VERSION) :]):
        raise IdentityHeaderError(f"{SIGNATURE_HEADER} is malformed: expected 43 base64url characters")

    subject = _decode(raw_subject, SUBJECT_HEADER)
    groups = tuple(_decode(item, GROUPS_HEADER) for item in raw_groups.split(",")) if raw_groups else ()
    try:
        identity = Identity(subject=subject, groups=groups)
    except ValueError as exc:
        raise IdentityHeaderError(f"identity headers are invalid: {exc}") from None

    expected = _SIGNATURE_VERSION + _mac(
        key, cluster=cluster, method=method, timestamp=timestamp, identity=identity
    )
    if not hmac.compare_digest(expected.encode("ascii"), raw_signature.encode("ascii")):
        raise IdentityHeaderError(
            f"{SIGNATURE_HEADER} does not match: not signed by the hub for cluster {cluster!r} "
            f"and method {method}"
        )

    current = time.time() if now is None else now
    age = current - timestamp
    if age > max_skew_seconds:
        raise IdentityHeaderError(
            f"identity headers expired: {TIMESTAMP_HEADER} is {age:.0f}s old "
            f"(accepted: {max_skew_seconds:g}s); check the clocks of hub and agent"
        )
    if -age > max_skew_seconds:
        raise IdentityHeaderError(
            f"{TIMESTAMP_HEADER} is {-age:.0f}s in the future "
            f"(accepted: {max_skew_seconds:g}s); check the clocks of hub and agent"
        )
    return identity


@overload
def strip_identity_headers(headers: Mapping[str, str]) -> dict[str, str]: ...


@overload
def strip_identity_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]: ...


@overload
def strip_identity_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]: ...


def strip_identity_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]],
) -> dict[str, str] | list[tuple[str, str]] | list[tuple[bytes, bytes]]:
    """Drop every ``X-Otterscale-*`` header (any case) so a client cannot smuggle an identity.

    A mapping gives a new dict; an iterable of ``(name, value)`` pairs (``str`` or ASGI-style
    ``bytes``) gives a new list. The input is not modified.
    """
    if isinstance(headers, Mapping):
        return {name: value for name, value in headers.items() if not _is_identity_header(name)}
    pairs: list[Any] = [pair for pair in headers if not _is_identity_header(pair[0])]
    return pairs


def _is_identity_header(name: str | bytes) -> bool:
    if isinstance(name, bytes):
        return name.lower().startswith(IDENTITY_HEADER_PREFIX.encode("ascii"))
    return name.lower().startswith(IDENTITY_HEADER_PREFIX)


def _check_arguments(key: bytes, cluster: str, method: str) -> None:
    if not isinstance(key, bytes) or len(key) < _MIN_KEY_LENGTH:
        raise ValueError(f"identity key must be at least {_MIN_KEY_LENGTH} bytes (use derive_identity_key)")
    if not cluster:
        raise ValueError("cluster must not be empty")
    if not method.startswith("/"):
        raise ValueError(
            "method must be the full procedure path, e.g. /otterscale.resource.v1.ResourceService/Get"
        )


def _identity_headers(headers: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if not lowered.startswith(IDENTITY_HEADER_PREFIX):
            continue
        if lowered in found:
            raise IdentityHeaderError(f"header {name} is given more than once")
        found[lowered] = value
    return found


def _required(found: Mapping[str, str], name: str) -> str:
    value = found.get(name.lower())
    if value is None:
        raise IdentityHeaderError(f"header {name} is missing")
    if not value:
        raise IdentityHeaderError(f"header {name} is empty")
    return value


def _encode(value: str) -> str:
    return quote(value, safe=_SAFE_CHARS, encoding="utf-8", errors="strict")


def _decode(value: str, header: str) -> str:
    try:
        decoded = unquote(value, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise IdentityHeaderError(f"{header} is malformed: percent-encoding is not UTF-8") from None
    if not decoded or _encode(decoded) != value:
        raise IdentityHeaderError(f"{header} is malformed: not in canonical percent-encoding")
    return decoded


def _netstring(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"%d:%s," % (len(data), data)


def _mac(key: bytes, *, cluster: str, method: str, timestamp: int, identity: Identity) -> str:
    fields = [cluster, method, str(timestamp), identity.subject, str(len(identity.groups)), *identity.groups]
    return mac_fields(key, _LABEL, fields)
