"""The ResourceService handlers of a component that only passes raw messages on.

Both the proxy (to an agent) and the follower's forwarder (to the leader) serve the generated
ResourceService with a pass-through codec: every unary RPC is "send these bytes on and return the
answer", Watch is "send them on and stream the answer back". Subclasses say how, once, in
``_unary`` and ``_stream``; the method names are the generated protocol's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from ._codec import RawMessage
from ._observe import REQUEST_ID_HEADER, current_call


def next_hop_timeout_ms(ctx: RequestContext[Any, Any], hop: str) -> int | None:
    """The caller's remaining deadline for the call passed on to ``hop`` (None: it has none).

    deadline_exceeded at once if it has already passed, instead of a call that cannot succeed.
    """
    remaining = ctx.timeout_ms
    if remaining is None:
        return None
    if remaining <= 0:
        raise ConnectError(Code.DEADLINE_EXCEEDED, f"the deadline passed before the call reached {hop}")
    return max(1, int(remaining))


def with_request_id(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the current call's request id (so the next hop logs the same id)."""
    call = current_call()
    if call is not None:
        headers[REQUEST_ID_HEADER] = call.request_id
    return headers


async def close_upstream(upstream: AsyncIterator[RawMessage]) -> None:
    """Close a passed-on stream now (HTTP/2 RST_STREAM), not whenever it is garbage-collected."""
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        await aclose()


class PassThroughResourceService:
    """ResourceService handlers that hand each call to :meth:`_unary` or :meth:`_stream`."""

    async def _unary(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        raise NotImplementedError

    def _stream(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> AsyncIterator[RawMessage]:
        raise NotImplementedError

    async def discovery(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """Pass Discovery on."""
        return await self._unary(request, ctx)

    async def schema(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """Pass Schema on."""
        return await self._unary(request, ctx)

    async def list(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """Pass List on."""
        return await self._unary(request, ctx)

    async def get(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """Pass Get on."""
        return await self._unary(request, ctx)

    async def describe(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """Pass Describe on."""
        return await self._unary(request, ctx)

    async def create(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """Pass Create on."""
        return await self._unary(request, ctx)

    async def apply(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """Pass Apply on."""
        return await self._unary(request, ctx)

    async def delete(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """Pass Delete on."""
        return await self._unary(request, ctx)

    def watch(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> AsyncIterator[RawMessage]:
        """Pass Watch on as a stream."""
        return self._stream(request, ctx)
