"""Who is calling: the bearer token of a request, verified against the OIDC issuer.

The hub starts and stays up while the issuer (Keycloak) is down: the verifier fetches keys on
first use, so until it can, calls fail with unavailable ("cannot fetch the signing keys of ...")
rather than the hub failing to start. A missing, malformed, expired or foreign token is
unauthenticated.

A verified token is remembered for a short while (:data:`CACHE_SECONDS`, never past its own
``exp``): a client sends the same token with every call, and verifying an RS256 signature with
PyJWT costs a few hundred microseconds, more than the rest of the hub's work on a call. The cache
is keyed by a SHA-256 of the token (no token is kept), bounded (:data:`CACHE_SIZE`), and holds
only successes. Its one cost: a signing key the issuer withdraws keeps its tokens valid for at
most :data:`CACHE_SECONDS` more.

Never logs a token or any part of one; messages say what is wrong, not what was sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from otterscale.common import AuthenticationError, Identity, OIDCVerifier

logger = logging.getLogger(__name__)

#: How long a verified token is trusted without verifying it again (never past its ``exp``).
CACHE_SECONDS = 60.0
#: How many verified tokens are remembered at most.
CACHE_SIZE = 4096

_BEARER = "bearer"


class Authenticator:
    """Turns a request's ``Authorization`` header into a verified :class:`Identity`."""

    def __init__(
        self,
        verifier: OIDCVerifier,
        *,
        cache_seconds: float = CACHE_SECONDS,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self._cache_seconds = cache_seconds
        self._cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()

    async def authenticate(self, authorization: Sequence[str]) -> Identity:
        """Verify the one ``Authorization: Bearer <token>`` value among ``authorization``.

        Raises :class:`AuthenticationError` (unauthenticated) or
        ``IdentityProviderUnavailableError`` (unavailable).
        """
        if not authorization:
            raise AuthenticationError("missing credentials: send Authorization: Bearer <OIDC token>")
        if len(authorization) > 1:
            raise AuthenticationError("more than one Authorization header")
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() != _BEARER:
            raise AuthenticationError("the Authorization header must use the Bearer scheme")
        token = token.strip()
        if not token:
            raise AuthenticationError("the Authorization header has an empty bearer token")
        if self._cache_seconds <= 0:
            return await self._verifier.verify(token)
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None:
            identity, until = cached
            if now < until:
                self._cache.move_to_end(digest)
                return identity
            del self._cache[digest]
        identity = await self._verifier.verify(token)
        until = now + self._cache_seconds
        expires = _expiry(token)
        if expires is not None:
            until = min(until, expires)
        if until > now:
            self._cache[digest] = (identity, until)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity

    def expiry(self, authorization: Sequence[str]) -> float | None:
        """The ``exp`` of the bearer token in ``authorization`` (call after :meth:`authenticate`
        succeeded for it): long-lived streams open no new upstream call after it."""
        if len(authorization) != 1:
            return None
        _, _, token = authorization[0].strip().partition(" ")
        return _expiry(token.strip())

    async def aclose(self) -> None:
        """Close the verifier's HTTP session and forget every cached token."""
        self._cache.clear()
        await self._verifier.aclose()


def _expiry(token: str) -> float | None:
    """The ``exp`` of a token that was just verified (so it is well formed), or None."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
    except (IndexError, ValueError, AttributeError):
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
