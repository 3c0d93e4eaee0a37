"""A local OIDC issuer: discovery document and JWKS over real HTTP on loopback.

For the benchmark and the soak test, which need many long-lived tokens and no Keycloak start-up:
the hub's configuration points ``keycloak.realm_url`` at this issuer, which serves
``/.well-known/openid-configuration`` and the key set (aiohttp, on its own event loop in a daemon
thread, so a busy load generator never delays a hub's key fetch). An RS256 key is generated at
start; :meth:`LocalIssuer.token` signs tokens with it. The hub verifies them exactly as it
verifies Keycloak's (same verifier, same network fetches). Tests of the system against a real
identity provider use the ``keycloak`` fixture instead.

Never logs a token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

REALM_PATH = "/realms/otterscale-local"
KID = "local-rs256"


class LocalIssuer:
    """Serve an OIDC issuer on ``host`` (default 127.0.0.1) until :meth:`stop`; sign tokens with
    :meth:`token`. The test node's Pods reach it when ``host`` is the node's ``host_ip``."""

    def __init__(self, key: rsa.RSAPrivateKey | None = None, *, host: str = "127.0.0.1") -> None:
        self._key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._host = host
        self.url = ""
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="local-oidc-issuer", daemon=True)

    def start(self) -> LocalIssuer:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the local OIDC issuer did not start within 30s")
        if self._error is not None:
            raise RuntimeError("the local OIDC issuer failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def token(
        self,
        subject: str,
        groups: tuple[str, ...] = (),
        *,
        audience: str,
        lifetime: float = 3600.0,
        key: rsa.RSAPrivateKey | None = None,
        header_type: str | None = None,
        **claims: Any,
    ) -> str:
        """A signed RS256 access token for ``subject`` with a ``groups`` claim.

        Marked as an access token as Keycloak marks one (``typ: Bearer``, ``azp``), so the hub's
        token-type check passes; ``typ="ID"`` makes it look like an ID token, ``typ=None`` drops
        the claim, and ``header_type="at+jwt"`` sets the RFC 9068 header instead. ``lifetime`` may
        be negative (an expired token); ``key`` signs with another key under this issuer's key id
        (a forgery); ``claims`` are added or override the standard ones (None removes one).
        """
        now = int(time.time())
        payload = {
            "iss": self.url,
            "aud": audience,
            "sub": subject,
            "typ": "Bearer",
            "azp": audience,
            "groups": list(groups),
            "iat": now,
            "exp": now + int(lifetime),
            **claims,
        }
        payload = {name: value for name, value in payload.items() if value is not None}
        headers = {"kid": KID} if header_type is None else {"kid": KID, "typ": header_type}
        return jwt.encode(payload, key or self._key, algorithm="RS256", headers=headers)

    def _jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(self._key.public_key()))
        jwk.update(kid=KID, alg="RS256", use="sig")
        return {"keys": [jwk]}

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(); the thread just ends
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        jwks = self._jwks()

        async def discovery(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            return web.json_response(
                {"issuer": self.url, "jwks_uri": self.url + "/protocol/openid-connect/certs"}
            )

        async def certs(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            return web.json_response(jwks)

        app = web.Application()
        app.router.add_get(REALM_PATH + "/.well-known/openid-configuration", discovery)
        app.router.add_get(REALM_PATH + "/protocol/openid-connect/certs", certs)
        runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}{REALM_PATH}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
