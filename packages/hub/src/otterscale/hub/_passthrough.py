"""The eight ResourceService handlers of a component that only passes raw messages on.

Both the proxy (to an agent) and the follower's forwarder (to the leader) serve the generated
ResourceService with a pass-through codec: every unary RPC is "send these bytes on and return the
answer", Watch is "send them on and stream the answer back". Subclasses say how, once, in
``_unary`` and ``_stream``; the method names are the generated protocol's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from ._codec import RawMessage


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
