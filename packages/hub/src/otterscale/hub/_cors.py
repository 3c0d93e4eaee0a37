"""CORS: which browser pages of other origins may read the hub's answers (``cors`` in otterscale.yaml).

:func:`with_cors` wraps the hub's whole router, so the layer runs before authentication (a
preflight carries no token and must never get 401) and on every replica (a follower answers
preflights itself instead of forwarding them). With no ``cors.allowed_origins`` the router is
returned unchanged: same-origin only, no CORS header on any response.

Preflights (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) are answered here
with 204 and never reach a service. An allowed origin asking for an allowed method (GET, POST)
and allowed headers (Connect's and gRPC-Web's own, ``Authorization``, ``X-Request-Id`` and
``cors.extra_allowed_headers``) gets them echoed with ``Access-Control-Max-Age: 7200``; anything
else gets the 204 without CORS headers (the browser then blocks the call) and a debug log line.
Actual requests are always passed on: an allowed origin's response carries
``Access-Control-Allow-Origin: <origin>`` and the exposed headers (``Grpc-Status``,
``Grpc-Message``... so a page sees gRPC-Web errors), and every response ``Vary: Origin``.

CORS is not access control: the bearer token is. This layer never refuses a request and never
reads a body; it only adds or withholds headers. It logs at most a bounded excerpt of what a
client sent, never a header value other than the origin.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from otterscale.common import ASGIApp, CorsConfig, drain_request

__all__ = [
    "ALLOWED_METHODS",
    "ALLOWED_REQUEST_HEADERS",
    "EXPOSED_HEADERS",
    "MAX_AGE_SECONDS",
    "CorsLayer",
    "CorsPolicy",
    "with_cors",
]

logger = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Connect uses POST (and GET for side-effect-free unaries); gRPC-Web only POST.
ALLOWED_METHODS = ("GET", "POST")
#: What Connect's and gRPC-Web's browser clients send (connect-go's ``connectcors`` list), plus
#: ``Authorization`` (the bearer token; the original service forgot it, so no cross-origin call
#: could authenticate) and ``X-Request-Id``. Lower-case: header names compare case-insensitively.
ALLOWED_REQUEST_HEADERS = (
    "content-type",
    "connect-protocol-version",
    "connect-timeout-ms",
    "connect-accept-encoding",
    "connect-content-encoding",
    "accept-encoding",
    "content-encoding",
    "grpc-timeout",
    "x-grpc-web",
    "x-user-agent",
    "authorization",
    "x-request-id",
)
#: Response headers a page may read besides the CORS-safelisted ones: the encodings, gRPC-Web's
#: status (a trailers-only error is all headers) and the request id the hub's errors mention.
EXPOSED_HEADERS = (
    "Content-Encoding",
    "Connect-Content-Encoding",
    "Grpc-Status",
    "Grpc-Message",
    "Grpc-Status-Details-Bin",
    "X-Request-Id",
)
#: Chromium caps a cached preflight at 2 h (Firefox at 24 h): one preflight per page and 2 h.
MAX_AGE_SECONDS = 7200

#: A preflight asking for more headers than this is refused without comparing them one by one.
_MAX_REQUESTED_HEADERS = 64
#: At most this much of a refused origin goes into the debug log.
_LOGGED_ORIGIN_CHARS = 200
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DEFAULT_PORT_SUFFIX = (("http://", ":80"), ("https://", ":443"))
_PREFLIGHT_VARY = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


class CorsPolicy:
    """The matching rules of one ``cors`` section (pure: no I/O, so unit tests cover every rule).

    Origins in the configuration are already canonical (``CorsConfig`` validated them):
    lower-case scheme and host, no default port. An incoming ``Origin`` is compared after the
    same normalisation; ``scheme://*.suffix[:port]`` matches exactly one DNS label in place of
    ``*``; ``*`` matches any origin except ``null`` (sandboxed frames and local files, which
    cannot be told apart).
    """

    def __init__(self, config: CorsConfig) -> None:
        origins = config.allowed_origins
        self.enabled = bool(origins)
        self.any_origin = "*" in origins
        self.allow_credentials = config.allow_credentials
        self._exact = frozenset(origin for origin in origins if "*" not in origin)
        wildcards: list[tuple[str, str]] = []
        for origin in origins:
            scheme, sep, rest = origin.partition("://*")
            if sep:  # "https://*.example.com:8443" -> ("https://", ".example.com:8443")
                wildcards.append((scheme + "://", rest))
        self._wildcards = tuple(wildcards)
        self.allowed_headers = frozenset((*ALLOWED_REQUEST_HEADERS, *config.extra_allowed_headers))
        self._expose = ", ".join(EXPOSED_HEADERS).encode()

    def allows_origin(self, origin: str) -> bool:
        """Whether ``origin`` (an ``Origin`` header's value) may read the hub's answers."""
        canonical = _canonical_origin(origin)
        if canonical is None:
            return False
        if self.any_origin or canonical in self._exact:
            return True
        for scheme, suffix in self._wildcards:
            if canonical.startswith(scheme) and canonical.endswith(suffix):
                label = canonical[len(scheme) : len(canonical) - len(suffix)]
                if _LABEL_RE.fullmatch(label):
                    return True
        return False

    def preflight(self, origin: str, method: str, requested_headers: str) -> list[tuple[bytes, bytes]] | str:
        """The CORS headers of the preflight's answer, or why none are sent (for the debug log)."""
        if not self.allows_origin(origin):
            return "origin not allowed"
        if method.upper() not in ALLOWED_METHODS:
            return f"method {method[:20]!r} not allowed"
        names = [name.strip().lower() for name in requested_headers.split(",")]
        names = [name for name in names if name]
        if len(names) > _MAX_REQUESTED_HEADERS:
            return f"{len(names)} request headers asked for (at most {_MAX_REQUESTED_HEADERS})"
        refused = [name for name in names if name not in self.allowed_headers]
        if refused:
            shown = ", ".join(name[:40] for name in refused[:5])
            return f"request header(s) not allowed: {shown} (cors.extra_allowed_headers adds headers)"
        headers = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", method.upper().encode("latin-1")),
            (b"access-control-max-age", str(MAX_AGE_SECONDS).encode()),
        ]
        if names:
            headers.append((b"access-control-allow-headers", ", ".join(names).encode("latin-1")))
        if self.allow_credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def response_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an actual response to an allowed ``origin`` (empty when refused)."""
        if not self.allows_origin(origin):
            return []
        headers = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-expose-headers", self._expose),
        ]
        if self.allow_credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers


class CorsLayer:
    """The ASGI layer of :class:`CorsPolicy` (see the module docstring). Build with :func:`with_cors`."""

    def __init__(self, app: ASGIApp, policy: CorsPolicy) -> None:
        self._app = app
        self._policy = policy

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        origins = _header_values(scope, b"origin")
        origin = origins[0] if len(origins) == 1 else None
        if scope["method"] == "OPTIONS" and origins:
            requested = _header_values(scope, b"access-control-request-method")
            if requested:
                await self._preflight(scope, receive, send, origins, requested)
                return
        cors = self._policy.response_headers(origin) if origin is not None else []
        if origins and not cors:
            logger.debug("CORS: no CORS headers for origin %s (not allowed)", _shown(origins))

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _merged(message.get("headers", ()), cors)}
            await send(message)

        await self._app(scope, receive, send_with_cors)

    async def _preflight(
        self, scope: dict[str, Any], receive: Receive, send: Send, origins: list[str], method: list[str]
    ) -> None:
        if not await drain_request(receive):  # the (empty) body first, or hypercorn drops an h2 stream
            return
        if len(origins) != 1:
            decision: list[tuple[bytes, bytes]] | str = "more than one Origin header"
        elif len(method) != 1:
            decision = "more than one Access-Control-Request-Method header"
        else:
            requested = ",".join(_header_values(scope, b"access-control-request-headers"))
            decision = self._policy.preflight(origins[0], method[0], requested)
        headers = [(b"vary", _PREFLIGHT_VARY)]
        if isinstance(decision, str):
            logger.debug(
                "CORS: preflight from %s answered without CORS headers: %s", _shown(origins), decision
            )
        else:
            headers.extend(decision)
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def with_cors(app: ASGIApp, config: CorsConfig) -> ASGIApp:
    """``app`` behind the ``cors`` policy; ``app`` itself when no origin is allowed (same-origin)."""
    policy = CorsPolicy(config)
    if not policy.enabled:
        return app
    if policy.any_origin:
        logger.warning(
            "cors.allowed_origins has '*': any web page may call the hub from its visitors' browsers "
            "(with a token only if the page has one); list the dashboards' origins instead"
        )
    logger.info(
        "CORS: browser pages of %d origin(s) may call the hub (credentials %s)",
        len(config.allowed_origins),
        "allowed" if policy.allow_credentials else "not allowed",
        extra={"cors_origins": list(config.allowed_origins)},
    )
    return CorsLayer(app, policy)


def _canonical_origin(origin: str) -> str | None:
    """``origin`` as browsers serialise it (lower case, no default port), or None if not http(s)."""
    if len(origin) > 2048 or not origin.isascii():
        return None
    text = origin.lower()
    for scheme, default_port in _DEFAULT_PORT_SUFFIX:
        if text.startswith(scheme):
            return text.removesuffix(default_port)
    return None


def _header_values(scope: dict[str, Any], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


def _merged(
    headers: Iterable[tuple[bytes, bytes]], cors: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """``headers`` with ours instead of any CORS header already there, and ``Origin`` in ``Vary``.

    Replacing, not appending: a browser refuses a response with two Allow-Origin headers, which
    is what a follower would send if an inner hop ever added its own.
    """
    result: list[tuple[bytes, bytes]] = []
    vary: list[bytes] = []
    for key, value in headers:
        lower = key.lower()
        if lower == b"vary":
            vary.extend(part.strip() for part in value.split(b",") if part.strip())
        elif not lower.startswith(b"access-control-"):
            result.append((key, value))
    if not any(part.lower() == b"origin" for part in vary):
        vary.append(b"Origin")
    result.append((b"vary", b", ".join(vary)))
    result.extend(cors)
    return result


def _shown(origins: list[str]) -> str:
    return ", ".join(repr(origin[:_LOGGED_ORIGIN_CHARS]) for origin in origins[:3])
