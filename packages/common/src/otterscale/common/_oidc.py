"""Bearer token (OIDC JWT) verification against the issuer's published keys.

The hub must start and stay up while Keycloak is down, so nothing is fetched at construction:
the discovery document (``<issuer>/.well-known/openid-configuration``) and the key set
(``jwks_uri``) are fetched on first use, asynchronously, with a timeout on every request, and
cached. A token signed with an unknown ``kid`` triggers a refresh (key rotation) at most once per
``min_refresh_interval_seconds``, so a flood of forged ``kid`` values cannot hammer the issuer.
While no key set was ever fetched, attempts are spaced by ``UNAVAILABLE_RETRY_SECONDS`` and
callers in between get the last failure at once. A key set older than ``max_key_age_seconds`` is
refreshed on use; if that refresh fails the old keys stay in use (and a warning is logged).

Only asymmetric algorithms are accepted (RS*, PS*, ES256/384/512, EdDSA), and the token's
``alg`` must fit the key it names, so ``alg: none`` and HS256 "signed" with the public key (key
confusion) fail. ``iss``, ``aud`` and ``exp`` are required; ``exp``, ``nbf`` and ``iat`` must be
numbers (PyJWT alone accepts ``"exp": "1700000000"``, and a cache that reads the number back then
ignores the expiry) and are checked here with a small leeway.

Only access tokens are accepted (``require_access_token``, default on): Keycloak marks them with
the claim ``typ: Bearer``, RFC 9068 issuers with the header ``typ: at+jwt``. An ID token carries
the same issuer and, in Keycloak, the client as audience, so without this check a token meant for
the client application (and shown to it, logged by it, kept in browser storage) would open the
API. ``authorized_parties`` optionally limits the clients (``azp``) a token may have been issued to.

Never logs a token or puts one (or any part of one) into an error message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ._errors import AuthenticationError, IdentityProviderUnavailableError
from ._identity import MAX_GROUPS, Identity, identity_name_problem

if TYPE_CHECKING:
    import aiohttp
    from jwt.types import Options

    from ._config import KeycloakConfig

logger = logging.getLogger(__name__)

#: Signature algorithms a token may use. Symmetric (HS*) and ``none`` are never accepted.
ALLOWED_ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
#: Longest token accepted, in characters.
MAX_TOKEN_LENGTH = 16 * 1024
#: Largest discovery document or key set accepted, in bytes.
MAX_DOCUMENT_BYTES = 1024 * 1024
#: Spacing of fetch attempts while no key set has ever been fetched.
UNAVAILABLE_RETRY_SECONDS = 1.0

_TOKEN_RE = re.compile(r"[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*")
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

SessionFactory = Callable[[], "aiohttp.ClientSession"]


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What a verified token says: who it identifies, and until when (its numeric ``exp``)."""

    identity: Identity
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    key: Any  # a cryptography public key object
    alg: str | None  # the key set's "alg" for this key, when it names one

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        if alg.startswith(("RS", "PS")):
            return isinstance(self.key, rsa.RSAPublicKey)
        if alg in _EC_CURVES:
            return isinstance(self.key, ec.EllipticCurvePublicKey) and self.key.curve.name == _EC_CURVES[alg]
        if alg == "EdDSA":
            return isinstance(self.key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        return False


class OIDCVerifier:
    """Verifies bearer tokens of one OIDC issuer and turns them into an :class:`Identity`.

    Use ``async with`` (or call :meth:`aclose`) so the HTTP session is closed. ``session_factory``
    builds the aiohttp session on first use (for proxies or custom TLS); every request also carries
    its own timeout. ``clock`` (monotonic seconds) paces refreshes; tests pass a fake one.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        subject_claim: str = "sub",
        subject_prefix: str = "",
        groups_claim: str = "groups",
        groups_prefix: str = "",
        require_access_token: bool = True,
        authorized_parties: Sequence[str] = (),
        leeway_seconds: float = 30.0,
        timeout_seconds: float = 5.0,
        min_refresh_interval_seconds: float = 30.0,
        max_key_age_seconds: float = 3600.0,
        session_factory: SessionFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(issuer)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("issuer must be an http(s) URL")
        if not audience:
            raise ValueError("audience must not be empty")
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        self._issuer = issuer
        self._audience = audience
        self._subject_claim = subject_claim
        self._subject_prefix = subject_prefix
        self._groups_claim = groups_claim
        self._groups_prefix = groups_prefix
        self._require_access_token = require_access_token
        self._authorized_parties = frozenset(authorized_parties)
        self._leeway = leeway_seconds
        self._timeout = timeout_seconds
        self._min_refresh_interval = min_refresh_interval_seconds
        self._max_key_age = max_key_age_seconds
        self._session_factory = session_factory
        self._clock = clock
        self._discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"

        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._token_issuer: str | None = None  # the issuer exactly as discovery spells it
        self._jwks_uri: str | None = None
        self._keys: tuple[_Key, ...] | None = None
        self._fetched_at = 0.0
        self._attempts = 0
        self._last_attempt: float | None = None
        self._last_error: IdentityProviderUnavailableError | None = None
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: KeycloakConfig,
        *,
        session_factory: SessionFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> OIDCVerifier:
        """A verifier for the ``keycloak`` section of ``otterscale.yaml``."""
        return cls(
            issuer=config.realm_url,
            audience=config.expected_audience,
            subject_claim=config.subject_claim,
            subject_prefix=config.subject_prefix,
            groups_claim=config.groups_claim,
            groups_prefix=config.groups_prefix,
            require_access_token=config.require_access_token,
            authorized_parties=config.authorized_parties,
            leeway_seconds=config.leeway_seconds,
            timeout_seconds=config.timeout_seconds,
            min_refresh_interval_seconds=config.min_refresh_interval_seconds,
            session_factory=session_factory,
            clock=clock,
        )

    @property
    def issuer(self) -> str:
        """The configured issuer URL (``keycloak.realm_url``)."""
        return self._issuer

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened. The verifier cannot be used afterwards."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def verify(self, token: str) -> Identity:
        """Verify ``token`` (without the ``Bearer`` prefix) and return who it identifies.

        Raises :class:`AuthenticationError` when the token is malformed, forged, expired, for
        another issuer or audience, not an access token, or names a reserved user or group; and
        :class:`IdentityProviderUnavailableError` when the keys needed to decide cannot be fetched.
        """
        return (await self.verify_token(token)).identity

    async def verify_token(self, token: str) -> VerifiedToken:
        """:meth:`verify`, also returning the token's expiry (for callers that cache tokens)."""
        if not isinstance(token, str) or not token:
            raise AuthenticationError("bearer token is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthenticationError(f"bearer token is longer than {MAX_TOKEN_LENGTH} characters")
        if not _TOKEN_RE.fullmatch(token):
            if token.count(".") == 4:
                raise AuthenticationError("encrypted (JWE) tokens are not supported")
            raise AuthenticationError("bearer token is not a signed JWT (expected three base64url parts)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("bearer token header is malformed") from None
        alg = header.get("alg")
        if alg == "none" or not alg:
            raise AuthenticationError("unsigned tokens (alg none) are not accepted")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            if _unverified_type(token) in _REFRESH_TYPES:
                # Keycloak signs refresh tokens with the realm's HMAC key: say what was sent.
                raise AuthenticationError(_REFRESH_REFUSED)
            raise AuthenticationError(
                f"token algorithm is not accepted; accepted: {', '.join(ALLOWED_ALGORITHMS)}"
                if not (isinstance(alg, str) and alg.startswith("HS"))
                else f"symmetric token algorithm {alg} is not accepted"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("token key id (kid) must be a string")

        key = await self._key_for(kid)
        if not key.fits(alg):
            raise AuthenticationError(f"token algorithm {alg} does not match the issuer's key for its kid")
        claims = self._decode(token, key, alg)
        expires_at = self._check_times(claims)
        if self._require_access_token:
            _check_access_token(header, claims)
        azp = claims.get("azp")
        if self._authorized_parties and not (isinstance(azp, str) and azp in self._authorized_parties):
            raise AuthenticationError(
                "token was issued to a client (azp claim) that is not in keycloak.authorized_parties"
            )
        return VerifiedToken(identity=self._identity(claims), expires_at=expires_at)

    # ----------------------------------------------------------------------------------------------
    # Token checks

    def _decode(self, token: str, key: _Key, alg: str) -> dict[str, Any]:
        options: Options = {
            "require": ["exp", "iss", "aud"],
            # Times are checked by _check_times, which insists on numbers (PyJWT int()s strings).
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_sub": False,  # the subject claim is configurable and checked below
            "verify_jti": False,
            "enforce_minimum_key_length": True,
        }
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._token_issuer or self._issuer,
                options=options,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"token has no {exc.claim} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(f"token audience does not include {self._audience!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError(f"token issuer is not {self._token_issuer or self._issuer!r}") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthenticationError("token algorithm is not accepted") from None
        except jwt.InvalidKeyError:
            raise AuthenticationError("the issuer's signing key is not acceptable (too short?)") from None
        except jwt.DecodeError:
            raise AuthenticationError("token is malformed") from None
        except jwt.PyJWTError:
            raise AuthenticationError("token is invalid") from None

    def _check_times(self, claims: Mapping[str, Any]) -> float:
        """Check ``exp``, ``nbf`` and ``iat`` (numbers, with the leeway); return ``exp``."""
        for name in _TIME_CLAIMS:
            if name in claims and not _is_number(claims[name]):
                raise AuthenticationError(f"token claim {name} must be a number (seconds since the epoch)")
        now = time.time()
        expires_at = float(claims["exp"])
        if expires_at <= now - self._leeway:
            raise AuthenticationError("token has expired")
        for name in ("nbf", "iat"):
            if name in claims and float(claims[name]) > now + self._leeway:
                raise AuthenticationError("token is not yet valid (nbf or iat is in the future)")
        return expires_at

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        raw_subject = _claim(claims, self._subject_claim)
        subject = self._subject_prefix + raw_subject if isinstance(raw_subject, str) else raw_subject
        problem = identity_name_problem(subject, f"token subject (claim {self._subject_claim!r})")
        if problem:
            hint = "; set keycloak.subject_prefix" if "reserved" in problem else ""
            raise AuthenticationError(problem + hint)

        raw_groups = _claim(claims, self._groups_claim)
        if raw_groups is None:
            names: Sequence[object] = ()
        elif isinstance(raw_groups, str):
            names = (raw_groups,)
        elif isinstance(raw_groups, list):
            names = raw_groups
        else:
            raise AuthenticationError(f"token claim {self._groups_claim!r} must be a list of group names")
        groups: dict[str, None] = {}
        for name in names:
            if not isinstance(name, str):
                raise AuthenticationError(f"token claim {self._groups_claim!r} must contain only strings")
            group = self._groups_prefix + name
            problem = identity_name_problem(group, f"a group in token claim {self._groups_claim!r}")
            if problem:
                hint = "; set keycloak.groups_prefix" if "reserved" in problem else ""
                raise AuthenticationError(problem + hint)
            groups[group] = None
        if len(groups) > MAX_GROUPS:
            raise AuthenticationError(f"token carries more than {MAX_GROUPS} groups")
        assert isinstance(subject, str)
        return Identity(subject=subject, groups=tuple(groups))

    # ----------------------------------------------------------------------------------------------
    # Keys

    async def _key_for(self, kid: str | None) -> _Key:
        if self._keys is None:
            await self._refresh(min_interval=UNAVAILABLE_RETRY_SECONDS, must_succeed=True)
        elif self._clock() - self._fetched_at >= self._max_key_age:
            try:
                await self._refresh(min_interval=self._min_refresh_interval, must_succeed=True)
            except IdentityProviderUnavailableError as exc:
                logger.warning("keeping the cached signing keys of %s: %s", self._issuer, exc)
        key = self._lookup(kid)
        if key is None and kid is not None:
            # After a failed fetch the issuer may have rotated keys while it was away: retry at
            # the outage pace, not the refresh interval that stops forged kids from hammering it.
            failed = self._last_error is not None
            interval = UNAVAILABLE_RETRY_SECONDS if failed else self._min_refresh_interval
            await self._refresh(min_interval=interval, must_succeed=True)
            key = self._lookup(kid)
            if key is None and self._last_error is not None:
                # The key set is not known to be current: "try again" is true, "not trusted" may not be.
                raise IdentityProviderUnavailableError(
                    f"token is signed with a key id not seen before, and the issuer's keys cannot be "
                    f"fetched now: {self._last_error}"
                )
        if key is None:
            if kid is None:
                raise AuthenticationError("token has no key id (kid) and the issuer publishes several keys")
            raise AuthenticationError("token is signed with a key the issuer does not publish (unknown kid)")
        return key

    def _lookup(self, kid: str | None) -> _Key | None:
        keys = self._keys or ()
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((key for key in keys if key.kid == kid), None)

    async def _refresh(self, *, min_interval: float, must_succeed: bool) -> None:
        """Fetch the key set once, shared by concurrent callers and paced by ``min_interval``.

        A caller that waited for someone else's fetch uses its outcome instead of fetching again.
        When the fetch is skipped (too soon) and no keys exist, the last failure is raised again.
        """
        attempts_seen = self._attempts
        async with self._lock:
            if self._closed:
                raise IdentityProviderUnavailableError("the OIDC verifier is closed")
            now = self._clock()
            if self._attempts != attempts_seen or (
                self._last_attempt is not None and now - self._last_attempt < min_interval
            ):
                if self._keys is None and must_succeed:
                    raise IdentityProviderUnavailableError(
                        str(self._last_error or "the issuer's signing keys are not available")
                    )
                return
            try:
                keys = await self._fetch_keys()
            except IdentityProviderUnavailableError as exc:
                self._attempts += 1
                self._last_attempt = self._clock()
                self._last_error = exc
                logger.warning("cannot fetch the signing keys of %s: %s", self._issuer, exc)
                raise
            self._attempts += 1
            self._last_attempt = self._fetched_at = self._clock()
            self._keys = keys
            self._last_error = None
            logger.info("fetched %d signing keys of %s", len(keys), self._issuer)

    async def _fetch_keys(self) -> tuple[_Key, ...]:
        session = self._get_session()
        if self._jwks_uri is None:
            document = await self._get_json(session, self._discovery_url)
            issuer = document.get("issuer")
            if not isinstance(issuer, str) or issuer.rstrip("/") != self._issuer.rstrip("/"):
                raise IdentityProviderUnavailableError(
                    f"discovery document {_safe_url(self._discovery_url)} names issuer "
                    f"{issuer if isinstance(issuer, str) else None!r}, expected {self._issuer!r}"
                )
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not _acceptable_jwks_uri(jwks_uri, self._issuer):
                raise IdentityProviderUnavailableError(
                    f"discovery document {_safe_url(self._discovery_url)} has no usable jwks_uri "
                    "(an http(s) URL; https when the issuer uses https)"
                )
            self._token_issuer, self._jwks_uri = issuer, jwks_uri
        jwks_uri = self._jwks_uri
        try:
            document = await self._get_json(session, jwks_uri)
        except IdentityProviderUnavailableError:
            self._jwks_uri = None  # discover again next time: the key set may have moved
            raise
        keys = _parse_key_set(document)
        if not keys:
            raise IdentityProviderUnavailableError(
                f"key set {_safe_url(jwks_uri)} has no usable signing keys ({', '.join(ALLOWED_ALGORITHMS)})"
            )
        return keys

    def _get_session(self) -> aiohttp.ClientSession:
        # aiohttp is loaded with the first session (the first token to verify), not at start-up:
        # a hub that is not asked anything has no use for it, and it is a quarter of its imports.
        import aiohttp

        if self._session is None:
            if self._session_factory is not None:
                self._session = self._session_factory()
            else:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session

    async def _get_json(self, session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        import aiohttp  # loaded already: see _get_session

        shown = _safe_url(url)
        try:
            async with asyncio.timeout(self._timeout):
                async with session.get(
                    url,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                    headers={"Accept": "application/json"},
                ) as response:
                    if response.status != 200:
                        raise IdentityProviderUnavailableError(f"GET {shown} returned HTTP {response.status}")
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) > MAX_DOCUMENT_BYTES:
                            raise IdentityProviderUnavailableError(
                                f"GET {shown} returned more than {MAX_DOCUMENT_BYTES} bytes"
                            )
        except TimeoutError:
            raise IdentityProviderUnavailableError(
                f"GET {shown} timed out after {self._timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise IdentityProviderUnavailableError(f"GET {shown} failed: {_describe(exc)}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise IdentityProviderUnavailableError(f"GET {shown} did not return JSON") from None
        if not isinstance(document, dict):
            raise IdentityProviderUnavailableError(f"GET {shown} did not return a JSON object")
        return document


def _parse_key_set(document: Mapping[str, Any]) -> tuple[_Key, ...]:
    """The usable signing keys of a JWK set; encryption, symmetric and unknown keys are skipped."""
    raw_keys = document.get("keys")
    if not isinstance(raw_keys, list):
        return ()
    keys: list[_Key] = []
    for raw in raw_keys:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        if raw.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # "oct" (symmetric) keys are never trusted
        alg = raw.get("alg")
        if alg is not None and alg not in ALLOWED_ALGORITHMS:
            continue
        kid = raw.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            key = jwt.PyJWK(raw).key
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        if isinstance(
            key,
            rsa.RSAPrivateKey
            | ec.EllipticCurvePrivateKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        ):
            key = key.public_key()
        keys.append(_Key(kid=kid, key=key, alg=alg))
    return tuple(keys)


_TIME_CLAIMS = ("exp", "nbf", "iat")
_REFRESH_TYPES = frozenset({"refresh", "offline"})
_REFRESH_REFUSED = (
    "refresh tokens are not accepted: send the access token (Authorization: Bearer <access_token>)"
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_access_token(header: Mapping[str, Any], claims: Mapping[str, Any]) -> None:
    """Refuse a verified token that does not say it is an access token (see the module docstring)."""
    header_type = header.get("typ")
    if isinstance(header_type, str) and header_type.lower().removeprefix("application/") == "at+jwt":
        return
    claimed = claims.get("typ")
    kind = claimed.lower() if isinstance(claimed, str) else None
    if kind == "bearer":
        return
    if kind == "id":
        raise AuthenticationError("ID tokens are not accepted: send the access token of the login")
    if kind in _REFRESH_TYPES:
        raise AuthenticationError(_REFRESH_REFUSED)
    if claimed is not None:
        raise AuthenticationError("token is not an access token (its typ claim is not Bearer)")
    raise AuthenticationError(
        "token does not say it is an access token (no typ: Bearer claim, no at+jwt header); "
        "set keycloak.require_access_token: false for an issuer that marks neither"
    )


def _unverified_type(token: str) -> str | None:
    """The ``typ`` claim of a token that is about to be refused anyway, to say what it was."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    kind = claims.get("typ") if isinstance(claims, dict) else None
    return kind.lower() if isinstance(kind, str) else None


def _claim(claims: Mapping[str, Any], name: str) -> object:
    """A claim by name; a dotted name (``realm_access.roles``) walks nested objects when no claim
    has the literal name."""
    if name in claims:
        return claims[name]
    value: object = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _acceptable_jwks_uri(uri: str, issuer: str) -> bool:
    parts = urlsplit(uri)
    if not parts.hostname:
        return False
    if urlsplit(issuer).scheme == "https":
        return parts.scheme == "https"
    return parts.scheme in ("http", "https")


def _safe_url(url: str) -> str:
    """The URL without user info, query or fragment, for messages."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
