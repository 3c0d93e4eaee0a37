"""Who is calling: the bearer token of a request, verified against the OIDC issuer.

The hub starts and stays up while the issuer (Keycloak) is down: the verifier fetches keys on
first use, so until it can, calls fail with unavailable ("cannot fetch the signing keys of ...")
rather than the hub failing to start. A missing, malformed, expired or foreign token is
unauthenticated.

A verified token is remembered for a short while (:data:`CACHE_SECONDS`, never past its own
``exp``): a client sends the same token with every call, and verifying an RS256 signature with
PyJWT costs a few hundred microseconds, more than the rest of the hub's work on a call. The cache
is keyed by a SHA-256 of the token (no token is kept), bounded (:data:`CACHE_SIZE`), and holds
only successes, each until the numeric ``exp`` the verifier checked (a token without one is never
verified, so never cached). Its one cost: a signing key the issuer withdraws keeps its tokens
valid for at most :data:`CACHE_SECONDS` more.

The verified caller is also recorded on the running call (:func:`._observe.current_call`), so
the access log and the audit trail name the same subject and groups the agent acts as.

:class:`AuthInterceptor` authenticates every call of an authenticated service from its headers
alone, before connectrpc reads the request body: an unauthenticated request never has its body
read and never reaches a handler (a flood of unfinished requests without a token costs the hub
one answer each). Handlers then take the caller from :meth:`Authenticator.caller`.

Never logs a token or any part of one; messages say what is wrong, not what was sent.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from connectrpc.request import RequestContext

from otterscale.common import AuthenticationError, Identity, OIDCVerifier, OtterscaleError

from ._errors import to_connect_error
from ._observe import current_call

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
        self._cache: OrderedDict[bytes, tuple[Identity, float, float]] = OrderedDict()

    async def authenticate(self, authorization: Sequence[str]) -> Identity:
        """Verify the one ``Authorization: Bearer <token>`` value among ``authorization``.

        Raises :class:`AuthenticationError` (unauthenticated) or
        ``IdentityProviderUnavailableError`` (unavailable).
        """
        return (await self.authenticate_until(authorization))[0]

    async def authenticate_until(self, authorization: Sequence[str]) -> tuple[Identity, float]:
        """:meth:`authenticate`, with the token's ``exp`` (seconds since the epoch): a
        long-lived stream opens no new upstream call on the caller's behalf after it."""
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
        identity, expires_at = await self._verified(token)
        call = current_call()
        if call is not None:
            call.subject, call.groups = identity.subject, identity.groups
            call.identity = identity
        return identity, expires_at

    async def caller(self, ctx: RequestContext[Any, Any]) -> Identity:
        """The verified caller of the running call, authenticated once per call (by
        :class:`AuthInterceptor` when it runs first)."""
        call = current_call()
        if call is not None and call.identity is not None:
            return call.identity
        return await self.authenticate(ctx.request_headers.getall("authorization"))

    async def _verified(self, token: str) -> tuple[Identity, float]:
        if self._cache_seconds <= 0:
            verified = await self._verifier.verify_token(token)
            return verified.identity, verified.expires_at
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None:
            identity, until, expires_at = cached
            if now < until:
                self._cache.move_to_end(digest)
                return identity, expires_at
            del self._cache[digest]
        verified = await self._verifier.verify_token(token)
        until = min(now + self._cache_seconds, verified.expires_at)
        if until > now:
            self._cache[digest] = (verified.identity, until, verified.expires_at)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return verified.identity, verified.expires_at

    async def aclose(self) -> None:
        """Close the verifier's HTTP session and forget every cached token."""
        self._cache.clear()
        await self._verifier.aclose()


class AuthInterceptor:
    """A connectrpc metadata interceptor: authenticate before the request body is read."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        """Verify the caller's token; refuse the call (unauthenticated, unavailable) otherwise."""
        try:
            await self._auth.caller(ctx)
        except OtterscaleError as exc:
            raise to_connect_error(exc) from None

    async def on_end(self, token: None, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        """Nothing to do after the call."""
