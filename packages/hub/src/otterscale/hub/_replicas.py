"""Proof that a call came from another replica of this hub, not from a client that says so.

A follower forwards each call to the leader with ``X-Otterscale-Forwarded-By: <replica>`` (the hop
guard of :mod:`._forward`, and ``forwarded_by`` in the leader's access log and audit trail) and
``X-Otterscale-Forwarded-For: <the caller's address>``. Anyone can send those headers, so they
carry a signature too::

    X-Otterscale-Forwarded-Signature: v1=<unix seconds>.<base64url HMAC-SHA256>

over the replica name, the caller's address, the timestamp and the request path, with a key every
replica derives from the tunnel server's key (``tunnel.server.key_seed`` or the content of
``key_file``): replicas share that configuration and clients never see it.

:class:`ReplicaHeaderGuard` wraps the hub's whole ASGI application and runs before anything
reads a header: a valid, fresh (``MAX_SKEW_SECONDS``) signature keeps the two headers (the
signature itself is dropped); anything else drops all three. So a client can neither make a
follower refuse its call as a "second hop", nor write a replica name or an address of its choice
into the leader's logs and audit trail.

Never logs a header value or a key.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from otterscale.common import ASGIApp, OtterscaleConfig, derive_key, mac_fields

from ._observe import FORWARDED_BY_HEADER, FORWARDED_FOR_HEADER

logger = logging.getLogger(__name__)

FORWARDED_SIGNATURE_HEADER = "x-otterscale-forwarded-signature"
#: How far a signature's timestamp may be from this replica's clock.
MAX_SKEW_SECONDS = 30.0

_PURPOSE = "hub-replica-forwarding-v1"
_VERSION = "v1="
_SIGNATURE_RE = re.compile(r"v1=([0-9]{1,12})\.([A-Za-z0-9_-]{43})")
_GUARDED = frozenset(
    name.encode("ascii") for name in (FORWARDED_BY_HEADER, FORWARDED_FOR_HEADER, FORWARDED_SIGNATURE_HEADER)
)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def replica_key(config: OtterscaleConfig) -> bytes:
    """The forwarding key of every replica sharing ``config`` (raises ``OSError`` if the key file
    cannot be read; the configuration check has already found it readable once)."""
    server = config.tunnel.server
    if server.key_seed is not None:
        secret: str | bytes = server.key_seed.get_secret_value()
    else:
        assert server.key_file is not None  # the configuration requires one of them
        secret = Path(server.key_file).read_bytes()
    return derive_key(secret, purpose=_PURPOSE)


class ReplicaSigner:
    """Signs the forwarding headers of a follower and checks those a leader receives."""

    def __init__(self, key: bytes, *, max_skew_seconds: float = MAX_SKEW_SECONDS) -> None:
        self._key = key
        self._max_skew = max_skew_seconds

    def headers(self, replica: str, source: str, path: str, *, now: float | None = None) -> dict[str, str]:
        """The headers a follower sends with a call to ``path`` it forwards for ``source``."""
        timestamp = str(int(time.time() if now is None else now))
        mac = mac_fields(self._key, _PURPOSE, (replica, source, timestamp, path))
        return {
            FORWARDED_BY_HEADER: replica,
            FORWARDED_FOR_HEADER: source,
            FORWARDED_SIGNATURE_HEADER: f"{_VERSION}{timestamp}.{mac}",
        }

    def valid(
        self, replica: str, source: str, signature: str, path: str, *, now: float | None = None
    ) -> bool:
        """Whether ``signature`` is a fresh signature of these values by a replica."""
        match = _SIGNATURE_RE.fullmatch(signature)
        if match is None or not replica:
            return False
        timestamp, mac = match.groups()
        current = time.time() if now is None else now
        if abs(current - int(timestamp)) > self._max_skew:
            return False
        expected = mac_fields(self._key, _PURPOSE, (replica, source, timestamp, path))
        return hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii"))


class ReplicaHeaderGuard:
    """ASGI middleware: keep the forwarding headers only when a replica signed them (see above)."""

    def __init__(self, app: ASGIApp, signer: ReplicaSigner) -> None:
        self._app = app
        self._signer = signer

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = self._checked(scope)
        await self._app(scope, receive, send)

    def _checked(self, scope: dict[str, Any]) -> dict[str, Any]:
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        found: dict[bytes, list[bytes]] = {}
        kept: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered in _GUARDED:
                found.setdefault(lowered, []).append(value)
            else:
                kept.append((name, value))
        if not found:
            return scope
        if self._trusted(found, scope.get("path", "")):
            kept += [(name, values[0]) for name, values in found.items() if name != _SIGNATURE_KEY]
        else:
            logger.debug("dropped unsigned or invalid forwarding headers from %s", _peer(scope))
        return {**scope, "headers": kept}

    def _trusted(self, found: dict[bytes, list[bytes]], path: str) -> bool:
        if any(len(values) != 1 for values in found.values()):
            return False
        try:
            replica = found.get(_BY_KEY, [b""])[0].decode("ascii")
            source = found.get(_FOR_KEY, [b""])[0].decode("ascii")
            signature = found.get(_SIGNATURE_KEY, [b""])[0].decode("ascii")
        except UnicodeDecodeError:
            return False
        return self._signer.valid(replica, source, signature, path)


_BY_KEY = FORWARDED_BY_HEADER.encode("ascii")
_FOR_KEY = FORWARDED_FOR_HEADER.encode("ascii")
_SIGNATURE_KEY = FORWARDED_SIGNATURE_HEADER.encode("ascii")


def _peer(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"
