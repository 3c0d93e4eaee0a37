"""OIDC bearer-token verification against a real local JWKS endpoint (aiohttp on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from otterscale.common import (
    AuthenticationError,
    Identity,
    IdentityProviderUnavailableError,
    KeycloakConfig,
    OIDCVerifier,
)

AUDIENCE = "otterscale"
REALM_PATH = "/realms/test"
CERTS_PATH = REALM_PATH + "/protocol/openid-connect/certs"
DISCOVERY_PATH = REALM_PATH + "/.well-known/openid-configuration"


# --------------------------------------------------------------------------------------------------
# Keys, tokens and a local issuer


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        data: dict[str, Any] = json.loads(algorithm.to_jwk(self.public))
        data.update(kid=self.kid, alg=self.alg, use="sig")
        return data

    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    rsa1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "rs": SigningKey("rsa-1", "RS256", rsa1),
        "rs2": SigningKey("rsa-2", "RS256", rsa2),
        "ps": SigningKey("rsa-ps", "PS256", rsa1),
        "es": SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1())),
        "es384": SigningKey("ec-384", "ES384", ec.generate_private_key(ec.SECP384R1())),
        "ed": SigningKey("ed-1", "EdDSA", ed25519.Ed25519PrivateKey.generate()),
    }


@dataclass
class Issuer:
    """A local OIDC issuer: discovery and JWKS over real HTTP, with switches for failure modes."""

    url: str = ""
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    discovery_requests: int = 0
    jwks_requests: int = 0
    mode: str = "ok"  # ok | garbage | status503 | hang | wrong-issuer | no-jwks-uri | huge
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self, *signing_keys: SigningKey, extra: list[dict[str, Any]] | None = None) -> None:
        self.jwks = {"keys": [key.jwk() for key in signing_keys] + (extra or [])}

    async def discovery(self, request: web.Request) -> web.StreamResponse:
        self.discovery_requests += 1
        if self.mode == "garbage":
            return web.Response(text="<html>this is not json</html>", content_type="text/html")
        if self.mode == "status503":
            return web.Response(status=503, text="down for maintenance")
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "huge":
            return web.Response(body=b"[" + b"0," * (1024 * 1024) + b"0]", content_type="application/json")
        document: dict[str, Any] = {
            "issuer": self.url,
            "jwks_uri": self.url + "/protocol/openid-connect/certs",
        }
        if self.mode == "wrong-issuer":
            document["issuer"] = "https://evil.example.com/realms/test"
        if self.mode == "no-jwks-uri":
            del document["jwks_uri"]
        return web.json_response(document)

    async def certs(self, request: web.Request) -> web.StreamResponse:
        self.jwks_requests += 1
        if self.mode == "jwks-garbage":
            return web.Response(text="{not json", content_type="application/json")
        return web.json_response(self.jwks)


@pytest.fixture
async def issuer(keys: dict[str, SigningKey]) -> AsyncIterator[Issuer]:
    state = Issuer()
    app = web.Application()
    app.router.add_get(DISCOVERY_PATH, state.discovery)
    app.router.add_get(CERTS_PATH, state.certs)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}{REALM_PATH}"
    state.publish(keys["rs"], keys["ps"], keys["es"], keys["es384"], keys["ed"])
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def verifier(issuer: Issuer, clock: FakeClock) -> AsyncIterator[OIDCVerifier]:
    async with OIDCVerifier(
        issuer=issuer.url, audience=AUDIENCE, timeout_seconds=2.0, clock=clock
    ) as instance:
        yield instance


def claims(issuer: Issuer, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": issuer.url,
        "aud": AUDIENCE,
        "sub": "0b6a1c6e-5d1c-4a4e-9d2e-2b7f9f6f1a11",
        "iat": now,
        "exp": now + 300,
        "typ": "Bearer",  # Keycloak's mark of an access token
        "groups": ["dev", "ops"],
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def sign(key: SigningKey, payload: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": key.kid, **headers})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: dict[str, Any], payload: dict[str, Any], *, hmac_secret: bytes | None = None) -> str:
    """A compact JWS built by hand (for algorithms pyjwt refuses to produce with these keys)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    signature = (
        b"" if hmac_secret is None else hmac.new(hmac_secret, signing_input.encode(), hashlib.sha256).digest()
    )
    return signing_input + "." + _b64(signature)


async def refused(verifier: OIDCVerifier, token: str, match: str) -> AuthenticationError:
    """Verify must fail with AuthenticationError matching ``match``, and never echo the token."""
    with pytest.raises(AuthenticationError, match=match) as caught:
        await asyncio.wait_for(verifier.verify(token), timeout=10)
    assert_no_token(str(caught.value), token)
    return caught.value


def assert_no_token(text: str, token: str) -> None:
    if len(token) >= 8:
        assert token not in text
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in text


# --------------------------------------------------------------------------------------------------
# Valid tokens


@pytest.mark.parametrize("name", ["rs", "ps", "es", "es384", "ed"])
async def test_valid_token_gives_identity(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], name: str
) -> None:
    token = sign(keys[name], claims(issuer))
    identity = await verifier.verify(token)
    assert identity == Identity("0b6a1c6e-5d1c-4a4e-9d2e-2b7f9f6f1a11", ("dev", "ops"))


async def test_keys_are_fetched_lazily_once_and_cached(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    assert (issuer.discovery_requests, issuer.jwks_requests) == (0, 0)  # nothing at construction
    for _ in range(5):
        await verifier.verify(sign(keys["rs"], claims(issuer)))
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)


async def test_concurrent_first_requests_share_one_fetch(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    token = sign(keys["es"], claims(issuer))
    results = await asyncio.wait_for(asyncio.gather(*(verifier.verify(token) for _ in range(20))), timeout=10)
    assert len(set(results)) == 1
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)


async def test_audience_can_be_a_list(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    token = sign(keys["rs"], claims(issuer, aud=["account", AUDIENCE]))
    assert (await verifier.verify(token)).subject


async def test_expired_within_leeway_is_accepted(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    now = int(time.time())
    token = sign(keys["rs"], claims(issuer, iat=now - 600, exp=now - 10))
    assert (await verifier.verify(token)).subject


async def test_token_without_kid_uses_the_only_key(
    issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    issuer.publish(keys["rs"])
    token = jwt.encode(claims(issuer), keys["rs"].private, algorithm="RS256")
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE, clock=clock) as verifier:
        assert (await verifier.verify(token)).subject


async def test_from_config(issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock) -> None:
    config = KeycloakConfig(
        realm_url=issuer.url,
        client_id="dashboard",
        audience="api",
        subject_claim="preferred_username",
        groups_claim="realm_access.roles",
        groups_prefix="kc:",
    )
    token = sign(
        keys["rs"],
        claims(issuer, aud="api", preferred_username="alice", realm_access={"roles": ["admin", "viewer"]}),
    )
    async with OIDCVerifier.from_config(config, clock=clock) as verifier:
        assert verifier.issuer == issuer.url
        assert await verifier.verify(token) == Identity("alice", ("kc:admin", "kc:viewer"))


async def test_audience_defaults_to_client_id(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    config = KeycloakConfig(realm_url=issuer.url, client_id=AUDIENCE)
    async with OIDCVerifier.from_config(config) as verifier:
        assert (await verifier.verify(sign(keys["rs"], claims(issuer)))).subject
        await refused(verifier, sign(keys["rs"], claims(issuer, aud="dashboard")), "audience")


async def test_trailing_slash_on_the_configured_issuer_is_tolerated(
    issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    async with OIDCVerifier(issuer=issuer.url + "/", audience=AUDIENCE) as verifier:
        assert (await verifier.verify(sign(keys["rs"], claims(issuer)))).subject


# --------------------------------------------------------------------------------------------------
# Invalid tokens


async def test_expired(verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    await refused(
        verifier, sign(keys["rs"], claims(issuer, iat=now - 900, exp=now - 120)), "token has expired"
    )


async def test_expired_with_zero_leeway(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE, leeway_seconds=0) as verifier:
        await refused(verifier, sign(keys["rs"], claims(issuer, exp=now - 10)), "expired")


async def test_not_yet_valid(verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    await refused(verifier, sign(keys["rs"], claims(issuer, nbf=now + 600)), "not yet valid")
    await refused(verifier, sign(keys["rs"], claims(issuer, iat=now + 600, exp=now + 900)), "not yet valid")


async def test_missing_exp(verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    payload = claims(issuer)
    del payload["exp"]
    await refused(verifier, sign(keys["rs"], payload), "no exp claim")


async def test_wrong_issuer(verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    await refused(
        verifier, sign(keys["rs"], claims(issuer, iss="https://evil.example.com/realms/test")), "issuer"
    )
    payload = claims(issuer)
    del payload["iss"]
    await refused(verifier, sign(keys["rs"], payload), "no iss claim")


async def test_wrong_audience(verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    await refused(
        verifier, sign(keys["rs"], claims(issuer, aud="account")), "audience does not include 'otterscale'"
    )
    payload = claims(issuer)
    del payload["aud"]
    await refused(verifier, sign(keys["rs"], payload), "no aud claim")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], alg: str
) -> None:
    token = forge({"alg": alg, "typ": "JWT", "kid": keys["rs"].kid}, claims(issuer))
    await refused(verifier, token, "not accepted")


async def test_missing_alg(verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    await refused(verifier, forge({"typ": "JWT"}, claims(issuer)), "alg none")


@pytest.mark.parametrize("secret", ["pem", "jwk"])
async def test_hs256_signed_with_the_public_key_is_refused(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], secret: str
) -> None:
    key = keys["rs"]
    material = key.public_pem() if secret == "pem" else json.dumps(key.jwk()).encode()
    token = forge({"alg": "HS256", "typ": "JWT", "kid": key.kid}, claims(issuer), hmac_secret=material)
    await refused(verifier, token, "symmetric token algorithm HS256")
    # The same HMAC under an asymmetric alg name is just a bad signature.
    token = forge({"alg": "RS256", "typ": "JWT", "kid": key.kid}, claims(issuer), hmac_secret=material)
    await refused(verifier, token, "signature is invalid")


async def test_symmetric_keys_in_the_key_set_are_never_used(
    issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    secret = b"s" * 32
    issuer.publish(keys["rs"], extra=[{"kty": "oct", "kid": "hmac", "k": _b64(secret), "alg": "HS256"}])
    token = forge({"alg": "RS256", "kid": "hmac"}, claims(issuer), hmac_secret=secret)
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE, clock=clock) as verifier:
        await refused(verifier, token, "unknown kid")


async def test_algorithm_must_fit_the_key(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    # Signed correctly with the EC key, but names the RSA key's kid.
    token = sign(keys["es"], claims(issuer), kid=keys["rs"].kid)
    await refused(verifier, token, "does not match the issuer's key")
    # The key set says rsa-1 is for RS256: a PS256 signature by the same RSA key is refused.
    token = jwt.encode(claims(issuer), keys["rs"].private, algorithm="PS256", headers={"kid": keys["rs"].kid})
    await refused(verifier, token, "does not match the issuer's key")


async def test_tampered_payload(verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    token = sign(keys["rs"], claims(issuer))
    header, _, signature = token.split(".")
    evil = _b64(json.dumps(claims(issuer, sub="admin", groups=["cluster-admins"])).encode())
    await refused(verifier, f"{header}.{evil}.{signature}", "signature is invalid")


async def test_signature_from_another_key(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    token = sign(keys["rs2"], claims(issuer), kid=keys["rs"].kid)
    await refused(verifier, token, "signature is invalid")


@pytest.mark.parametrize(
    ("token", "match"),
    [
        ("", "empty"),
        ("not-a-jwt", "not a signed JWT"),
        ("a.b", "not a signed JWT"),
        ("a.b.c.d.e", "JWE"),
        ("Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "not a signed JWT"),
        ("x" * 20000, "longer than"),
        ("!!!.###.$$$", "not a signed JWT"),
        ("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl", "no exp claim|malformed|kid|issuer"),
        ("bm90IGpzb24.e30.c2ln", "header is malformed"),
    ],
)
async def test_malformed_tokens(verifier: OIDCVerifier, token: str, match: str) -> None:
    await refused(verifier, token, match)


# --------------------------------------------------------------------------------------------------
# Identity from claims


async def test_groups_prefix_and_missing_groups(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE, groups_prefix="oidc:") as verifier:
        identity = await verifier.verify(
            sign(keys["rs"], claims(issuer, groups=["dev", "system:masters", "dev"]))
        )
        assert identity.groups == ("oidc:dev", "oidc:system:masters")
        identity = await verifier.verify(sign(keys["rs"], claims(issuer, groups=None)))
        assert identity.groups == ()


async def test_custom_claims(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    async with OIDCVerifier(
        issuer=issuer.url, audience=AUDIENCE, subject_claim="email", groups_claim="https://example.com/groups"
    ) as verifier:
        token = sign(
            keys["rs"], claims(issuer, email="alice@example.com", **{"https://example.com/groups": "ops"})
        )
        assert await verifier.verify(token) == Identity("alice@example.com", ("ops",))
        await refused(verifier, sign(keys["rs"], claims(issuer)), "subject .claim 'email'. must be a string")


async def test_reserved_subject_is_refused(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    await refused(verifier, sign(keys["rs"], claims(issuer, sub="system:admin")), "reserved prefix 'system:'")
    await refused(
        verifier,
        sign(keys["rs"], claims(issuer, sub="system:serviceaccount:kube-system:x")),
        "reserved prefix",
    )


async def test_empty_or_missing_subject_is_refused(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    await refused(verifier, sign(keys["rs"], claims(issuer, sub="")), "must not be empty")
    await refused(verifier, sign(keys["rs"], claims(issuer, sub=None)), "must be a string")
    await refused(verifier, sign(keys["rs"], claims(issuer, sub="a\nb")), "a control character")


async def test_reserved_group_is_refused_with_a_hint(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    await refused(
        verifier, sign(keys["rs"], claims(issuer, groups=["dev", "system:masters"])), "groups_prefix"
    )


@pytest.mark.parametrize("groups", [{"a": 1}, 42, ["dev", 7]])
async def test_malformed_groups_claim(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], groups: object
) -> None:
    await refused(verifier, sign(keys["rs"], claims(issuer, groups=groups)), "claim 'groups' must")


@pytest.mark.parametrize(
    ("claim", "value", "reason"),
    [
        ("groups", [" system:masters"], "reserved prefix 'system:'"),
        ("groups", ["dev", "system:masters\u200b"], "reserved prefix 'system:'"),
        ("groups", ["team a"], "a space (U+0020)"),
        ("groups", ["dev\u202e"], "an invisible format character"),
        ("sub", " system:kube-controller-manager", "reserved prefix 'system:'"),
        ("sub", "alice ", "leading or trailing whitespace"),
        ("sub", "ali\u200bce", "an invisible format character"),
        ("sub", "ali\u3000ce", "a space (U+3000)"),
    ],
)
async def test_padded_and_confusable_names_are_refused_naming_the_claim(
    verifier: OIDCVerifier,
    issuer: Issuer,
    keys: dict[str, SigningKey],
    claim: str,
    value: object,
    reason: str,
) -> None:
    error = await refused(verifier, sign(keys["rs"], claims(issuer, **{claim: value})), re.escape(reason))
    assert f"claim '{claim}'" in str(error)
    assert "masters" not in str(error)
    assert "alice" not in str(error)


async def test_subject_prefix(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    async with OIDCVerifier(
        issuer=issuer.url, audience=AUDIENCE, subject_prefix="oidc:", groups_prefix="oidc:"
    ) as verifier:
        identity = await verifier.verify(sign(keys["rs"], claims(issuer, sub="system:admin")))
        assert identity == Identity("oidc:system:admin", ("oidc:dev", "oidc:ops"))
        # A padded value stays padded behind the prefix, and is refused.
        await refused(verifier, sign(keys["rs"], claims(issuer, sub=" alice")), "a space")
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE) as verifier:
        await refused(verifier, sign(keys["rs"], claims(issuer, sub="system:admin")), "subject_prefix")


# --------------------------------------------------------------------------------------------------
# Token type, authorized party, numeric times


async def test_access_tokens_are_accepted_by_typ_claim_or_at_jwt_header(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    assert (await verifier.verify(sign(keys["rs"], claims(issuer)))).subject  # Keycloak: typ Bearer
    for header_type in ("at+jwt", "application/at+jwt", "AT+JWT"):
        token = sign(keys["rs"], claims(issuer, typ=None), typ=header_type)  # RFC 9068
        assert (await verifier.verify(token)).subject


@pytest.mark.parametrize(
    ("typ", "reason"),
    [
        ("ID", "ID tokens are not accepted"),
        ("Refresh", "refresh tokens are not accepted"),
        ("Offline", "refresh tokens are not accepted"),
        ("Logout", "not an access token"),
        (None, "does not say it is an access token"),
    ],
)
async def test_other_token_types_are_refused(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], typ: str | None, reason: str
) -> None:
    await refused(verifier, sign(keys["rs"], claims(issuer, typ=typ)), reason)
    # A JWT header that says "JWT" (what Keycloak writes) changes nothing.
    await refused(verifier, sign(keys["rs"], claims(issuer, typ=typ), typ="JWT"), reason)


async def test_a_keycloak_refresh_token_is_named_as_such(verifier: OIDCVerifier, issuer: Issuer) -> None:
    # Keycloak signs refresh tokens with the realm's HMAC key (HS512).
    token = forge(
        {"alg": "HS512", "typ": "JWT", "kid": "hmac"}, claims(issuer, typ="Refresh"), hmac_secret=b"x" * 64
    )
    await refused(verifier, token, "refresh tokens are not accepted: send the access token")


async def test_token_type_check_can_be_turned_off(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    config = KeycloakConfig(realm_url=issuer.url, client_id=AUDIENCE, require_access_token=False)
    async with OIDCVerifier.from_config(config) as verifier:
        assert (await verifier.verify(sign(keys["rs"], claims(issuer, typ=None)))).subject
        assert (await verifier.verify(sign(keys["rs"], claims(issuer, typ="ID")))).subject


async def test_authorized_parties(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    config = KeycloakConfig(realm_url=issuer.url, client_id=AUDIENCE, authorized_parties=["dashboard", "cli"])
    async with OIDCVerifier.from_config(config) as verifier:
        assert (await verifier.verify(sign(keys["rs"], claims(issuer, azp="cli")))).subject
        for azp in ("other-app", None, ["cli"]):
            await refused(verifier, sign(keys["rs"], claims(issuer, azp=azp)), "keycloak.authorized_parties")
    # Without a list, any azp is fine.
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE) as verifier:
        assert (await verifier.verify(sign(keys["rs"], claims(issuer, azp="other-app")))).subject


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value", ["{now}", True, None, [1], {"t": 1}], ids=["string", "bool", "null", "list", "map"]
)
async def test_times_that_are_not_numbers_are_refused(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], claim: str, value: object
) -> None:
    now = int(time.time())
    written = str(now + 300) if value == "{now}" else value
    if value is None and claim == "exp":
        await refused(verifier, sign(keys["rs"], claims(issuer, exp=None)), "no exp claim")
        return
    payload = claims(issuer)
    payload[claim] = written
    await refused(verifier, sign(keys["rs"], payload), f"claim {claim} must be a number")


async def test_infinite_or_huge_times_are_refused_cleanly(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    # Python's json reads 1e999 as inf and NaN as nan; int(inf) raised OverflowError in PyJWT.
    header = {"alg": "RS256", "kid": keys["rs"].kid}
    for raw in ("1e999", "NaN", "-1e999"):
        body = json.dumps(claims(issuer, exp=1)).replace('"exp": 1', f'"exp": {raw}')
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(body.encode())
        signature = jwt.get_algorithm_by_name("RS256").sign(signing_input.encode(), keys["rs"].private)
        await refused(verifier, signing_input + "." + _b64(signature), "claim exp must be a number")


async def test_verify_token_reports_the_numeric_expiry(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    now = int(time.time())
    verified = await verifier.verify_token(sign(keys["rs"], claims(issuer, exp=now + 123)))
    assert verified.expires_at == now + 123
    assert verified.identity.subject


# --------------------------------------------------------------------------------------------------
# Key rotation and refresh pacing


async def test_unknown_kid_refreshes_then_succeeds(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    issuer.publish(keys["rs"])
    await verifier.verify(sign(keys["rs"], claims(issuer)))
    assert issuer.jwks_requests == 1

    issuer.publish(keys["rs"], keys["rs2"])  # the issuer rotates in a new key
    clock.now += 31  # past the minimum refresh interval
    assert (await verifier.verify(sign(keys["rs2"], claims(issuer)))).subject
    assert issuer.jwks_requests == 2

    # A second unknown kid soon after does not refetch: the refresh interval paces it.
    unknown = SigningKey("rsa-3", "RS256", keys["rs2"].private)
    await refused(verifier, sign(unknown, claims(issuer)), "unknown kid")
    clock.now += 5
    await refused(verifier, sign(unknown, claims(issuer)), "unknown kid")
    assert issuer.jwks_requests == 2
    assert issuer.discovery_requests == 1

    clock.now += 30
    await refused(verifier, sign(unknown, claims(issuer)), "unknown kid")
    assert issuer.jwks_requests == 3


async def test_unknown_kid_right_after_a_fetch_is_not_refetched(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey]
) -> None:
    issuer.publish(keys["rs"])
    await refused(verifier, sign(keys["rs2"], claims(issuer)), "unknown kid")
    for index in range(10):
        forged = SigningKey(f"forged-{index}", "RS256", keys["rs2"].private)
        await refused(verifier, sign(forged, claims(issuer)), "unknown kid")
    assert issuer.jwks_requests == 1


async def test_old_key_sets_are_refreshed_and_kept_when_the_refresh_fails(
    issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with OIDCVerifier(
        issuer=issuer.url, audience=AUDIENCE, clock=clock, max_key_age_seconds=600, timeout_seconds=2
    ) as verifier:
        await verifier.verify(sign(keys["rs"], claims(issuer)))
        clock.now += 601
        await verifier.verify(sign(keys["rs"], claims(issuer)))
        assert issuer.jwks_requests == 2
        issuer.mode = "jwks-garbage"
        clock.now += 601
        with caplog.at_level(logging.WARNING):
            assert (await verifier.verify(sign(keys["rs"], claims(issuer)))).subject  # stale keys still work
        assert "keeping the cached signing keys" in caplog.text


async def test_key_set_skips_unusable_entries(
    issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    issuer.publish(
        keys["rs"],
        extra=[
            "not an object",
            {"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            {"kty": "EC", "kid": 5},
            {"kid": "no-kty"},
        ],
    )
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE, clock=clock) as verifier:
        assert (await verifier.verify(sign(keys["rs"], claims(issuer)))).subject


# --------------------------------------------------------------------------------------------------
# The identity provider is unavailable


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_endpoint_down_fails_fast_and_clearly(keys: dict[str, SigningKey], clock: FakeClock) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/realms/test"
    token = sign(keys["rs"], claims(Issuer(url=url)))
    async with OIDCVerifier(issuer=url, audience=AUDIENCE, timeout_seconds=2, clock=clock) as verifier:
        started = time.monotonic()
        with pytest.raises(IdentityProviderUnavailableError) as caught:
            await asyncio.wait_for(verifier.verify(token), timeout=5)
        assert time.monotonic() - started < 3
    message = str(caught.value)
    assert f"GET {url}/.well-known/openid-configuration failed" in message
    assert "Cannot connect" in message or "refused" in message.lower()
    assert_no_token(message, token)
    assert IdentityProviderUnavailableError.connect_code == "unavailable"


async def test_hanging_endpoint_times_out(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    issuer.mode = "hang"
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE, timeout_seconds=0.3) as verifier:
        started = time.monotonic()
        with pytest.raises(IdentityProviderUnavailableError, match=r"timed out after 0\.3s"):
            await asyncio.wait_for(verifier.verify(sign(keys["rs"], claims(issuer))), timeout=5)
        assert time.monotonic() - started < 2


async def test_hub_starts_while_the_issuer_is_down_and_recovers(
    issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    issuer.mode = "status503"
    token = sign(keys["rs"], claims(issuer))
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE, clock=clock) as verifier:
        with pytest.raises(IdentityProviderUnavailableError, match="returned HTTP 503"):
            await verifier.verify(token)
        # Callers right after a failure get the same answer at once, without another request.
        with pytest.raises(IdentityProviderUnavailableError, match="returned HTTP 503"):
            await verifier.verify(token)
        assert issuer.discovery_requests == 1

        issuer.mode = "ok"
        clock.now += 1.0
        assert (await verifier.verify(token)).subject
        assert issuer.discovery_requests == 2


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("garbage", "did not return JSON"),
        ("huge", "returned more than"),
        ("wrong-issuer", "names issuer 'https://evil.example.com/realms/test', expected"),
        ("no-jwks-uri", "no usable jwks_uri"),
        ("jwks-garbage", "certs did not return JSON"),
    ],
)
async def test_garbage_from_the_issuer(
    issuer: Issuer, keys: dict[str, SigningKey], mode: str, match: str
) -> None:
    issuer.mode = mode
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE) as verifier:
        with pytest.raises(IdentityProviderUnavailableError, match=match):
            await asyncio.wait_for(verifier.verify(sign(keys["rs"], claims(issuer))), timeout=5)


async def test_key_set_without_usable_keys(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    issuer.jwks = {"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}
    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE) as verifier:
        with pytest.raises(IdentityProviderUnavailableError, match="no usable signing keys"):
            await verifier.verify(sign(keys["rs"], claims(issuer)))


async def test_unknown_kid_while_the_issuer_is_down_is_unavailable(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    await verifier.verify(sign(keys["rs"], claims(issuer)))
    issuer.mode = "jwks-garbage"
    clock.now += 31
    with pytest.raises(IdentityProviderUnavailableError):
        await verifier.verify(sign(keys["rs2"], claims(issuer)))
    # Known keys keep working.
    assert (await verifier.verify(sign(keys["rs"], claims(issuer)))).subject


async def test_unknown_kid_after_an_outage_is_unavailable_then_fetched_at_the_outage_pace(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    issuer.publish(keys["rs"])
    await verifier.verify(sign(keys["rs"], claims(issuer)))
    issuer.mode = "jwks-garbage"  # the issuer goes away ...
    clock.now += 31
    with pytest.raises(IdentityProviderUnavailableError, match="did not return JSON"):
        await verifier.verify(sign(keys["rs2"], claims(issuer)))  # this one tried to fetch
    clock.now += 0.5
    with pytest.raises(IdentityProviderUnavailableError, match="key id not seen before"):
        await verifier.verify(sign(keys["rs2"], claims(issuer)))  # too soon to fetch again
    requests = issuer.jwks_requests
    issuer.mode = "ok"  # ... and comes back with a new key
    issuer.publish(keys["rs"], keys["rs2"])
    clock.now += 2  # well inside the 30 s refresh interval, past the 1 s outage pace
    assert (await verifier.verify(sign(keys["rs2"], claims(issuer)))).subject
    assert issuer.jwks_requests == requests + 1


async def test_closed_verifier_refuses_to_fetch(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    verifier = OIDCVerifier(issuer=issuer.url, audience=AUDIENCE)
    await verifier.aclose()
    with pytest.raises(IdentityProviderUnavailableError, match="closed"):
        await verifier.verify(sign(keys["rs"], claims(issuer)))


async def test_session_factory_is_used(issuer: Issuer, keys: dict[str, SigningKey]) -> None:
    import aiohttp

    made: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        session = aiohttp.ClientSession()
        made.append(session)
        return session

    async with OIDCVerifier(issuer=issuer.url, audience=AUDIENCE, session_factory=factory) as verifier:
        await verifier.verify(sign(keys["rs"], claims(issuer)))
    assert len(made) == 1
    assert made[0].closed


def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError, match="issuer"):
        OIDCVerifier(issuer="keycloak.example.com", audience=AUDIENCE)
    with pytest.raises(ValueError, match="audience"):
        OIDCVerifier(issuer="https://keycloak.example.com/realms/x", audience="")


# --------------------------------------------------------------------------------------------------
# Tokens never leak


async def test_tokens_never_appear_in_logs(
    verifier: OIDCVerifier, issuer: Issuer, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    now = int(time.time())
    tokens = [
        sign(keys["rs"], claims(issuer)),
        sign(keys["rs"], claims(issuer, exp=now - 3600)),
        sign(keys["rs2"], claims(issuer)),
    ]
    with caplog.at_level(logging.DEBUG):
        for token in tokens:
            try:
                await verifier.verify(token)
            except AuthenticationError as exc:
                assert_no_token(str(exc), token)
    for token in tokens:
        assert_no_token(caplog.text, token)
