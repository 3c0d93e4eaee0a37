"""The one place that decides who is calling: the hub's signed identity headers.

:class:`IdentityInterceptor` is the first interceptor of the chain: a call without a valid
signature (missing, malformed, wrong key, wrong cluster or RPC, expired) ends with
Unauthenticated before the handler runs, so nothing reaches Kubernetes. A valid signature's
:class:`~otterscale.common.Identity` is put in a context variable for the duration of the call;
handlers read it with :func:`current_identity`, which fails closed (Unauthenticated) if the
interceptor somehow did not run.

Never logs or returns header values (a signature is a credential); only the reason.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import Headers, RequestContext

from otterscale.common import Identity, IdentityHeaderError, LogThrottle, verify_identity

from ._errors import UnauthenticatedError

logger = logging.getLogger(__name__)

__all__ = ["EarlyIdentityInterceptor", "IdentityInterceptor", "current_identity", "procedure"]

_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "otterscale_identity", default=None
)


def current_identity() -> Identity:
    """The verified caller of the running call; Unauthenticated if there is none."""
    identity = _IDENTITY.get()
    if identity is None:
        raise UnauthenticatedError("no verified identity for this call")
    return identity


def procedure(ctx: RequestContext[Any, Any]) -> str:
    """The full procedure path a signature covers: ``/<service>/<method>``."""
    return f"/{ctx.method.service_name}/{ctx.method.name}"


class _EveryHeader(Mapping[str, str]):
    """A view of connectrpc Headers whose ``items()`` yields repeated headers too.

    verify_identity refuses an identity header given twice; a plain dict would hide the repeat.
    """

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def __getitem__(self, key: str) -> str:
        return self._headers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)

    def items(self) -> Any:
        return self._headers.allitems()


class IdentityInterceptor:
    """Verifies the hub's signature on every call (connectrpc interceptor of every call shape:
    connectrpc skips an interceptor for a shape it does not implement, so each is here).

    This variant runs after connectrpc has read the body; the agent serves with its subclass
    :class:`EarlyIdentityInterceptor`, which refuses an unsigned call before its body is read.
    """

    def __init__(self, *, cluster: str, key: bytes, max_skew_seconds: float = 30.0) -> None:
        self._cluster = cluster
        self._key = key
        self._max_skew = max_skew_seconds

    def _verify(self, ctx: RequestContext[Any, Any]) -> Identity:
        try:
            return verify_identity(
                _EveryHeader(ctx.request_headers),
                cluster=self._cluster,
                method=procedure(ctx),
                key=self._key,
                max_skew_seconds=self._max_skew,
            )
        except IdentityHeaderError as exc:
            if _REJECTIONS.allow():
                logger.info(
                    "rejected %s from %s: %s%s",
                    procedure(ctx),
                    ctx.client_address or "?",
                    exc,
                    _REJECTIONS.held_back(),
                )
            raise ConnectError(Code.UNAUTHENTICATED, f"hub identity rejected: {exc}") from exc

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        token = _IDENTITY.set(self._verify(ctx))
        try:
            return await call_next(request, ctx)
        finally:
            _IDENTITY.reset(token)

    async def intercept_server_stream(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[Any]:
        token = _IDENTITY.set(self._verify(ctx))
        stream = call_next(request, ctx)
        try:
            async for message in stream:
                yield message
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            _IDENTITY.reset(token)

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[Any], RequestContext[Any, Any]], Awaitable[Any]],
        request: AsyncIterator[Any],
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        # Only the request's shape differs from a unary call (as in _service's ErrorBoundary).
        return await self.intercept_unary(call_next, request, ctx)

    async def intercept_bidi_stream(
        self,
        call_next: Callable[[AsyncIterator[Any], RequestContext[Any, Any]], AsyncIterator[Any]],
        request: AsyncIterator[Any],
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[Any]:
        async for message in self.intercept_server_stream(call_next, request, ctx):
            yield message


class EarlyIdentityInterceptor(IdentityInterceptor):
    """:class:`IdentityInterceptor` as a metadata interceptor: connectrpc runs it before reading the
    request body, so a call without a valid signature never has its body read (inside Envoy)."""

    async def on_start(self, ctx: RequestContext[Any, Any]) -> contextvars.Token[Identity | None]:
        """Verify the signature; the identity holds for the rest of the call."""
        return _IDENTITY.set(self._verify(ctx))

    async def on_end(
        self,
        token: contextvars.Token[Identity | None],
        ctx: RequestContext[Any, Any],
        error: Exception | None,
    ) -> None:
        """The call is over: forget its identity."""
        _IDENTITY.reset(token)


#: Rejected calls are logged at most once every ten seconds (a flood must not flood the log).
_REJECTIONS = LogThrottle(10.0)
