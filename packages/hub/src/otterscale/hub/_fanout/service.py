"""The MultiClusterService handlers: authenticate, decode the request, run the call, translate errors.

Served by the generated ``MultiClusterServiceASGIApplication`` with the hub's pass-through
codecs: the request arrives as bytes in the caller's codec (it is small and decoded here), and
the response leaves as bytes the fan-out spliced together from the agents' answers in that same
codec (:mod:`.wire`), so no object is ever decoded or re-encoded.

Errors are translated once, here: the hub's own errors keep their code and message, a
``require_all`` failure carries every non-OK ClusterStatus as an error detail, and anything else
is a bug, logged with the request id and reported as internal without its text.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]
from protobuf.wkt import Any as AnyMessage

from otterscale.common import OtterscaleError
from otterscale.resource.v1.multicluster_pb2 import ClusterStatus, MultiListRequest, MultiWatchRequest

from .._auth import Authenticator
from .._codec import RawMessage
from .._errors import to_connect_error
from .._observe import current_call
from . import wire
from .errors import InvalidFanoutRequestError, RequireAllError
from .listing import MultiLister
from .watching import MultiWatcher

logger = logging.getLogger(__name__)


class MultiClusterServiceImpl:
    """MultiList and MultiWatch (the generated ``MultiClusterService`` protocol, pass-through codecs)."""

    def __init__(self, *, authenticator: Authenticator, lister: MultiLister, watcher: MultiWatcher) -> None:
        self._auth = authenticator
        self._lister = lister
        self._watcher = watcher

    async def multi_list(self, request: RawMessage, ctx: RequestContext[Any, Any]) -> RawMessage:
        """One page of a multi-cluster traversal."""
        try:
            identity = await self._auth.authenticate(ctx.request_headers.getall("authorization"))
            message = _decode(request, MultiListRequest())
            timeout = None if ctx.timeout_ms is None else max(0.0, ctx.timeout_ms / 1000)
            data = await self._lister.page(identity, message, request.codec, timeout)
        except Exception as exc:
            raise _translate(exc) from None
        return RawMessage(data, request.codec)

    async def multi_watch(
        self, request: RawMessage, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[RawMessage]:
        """One stream of every selected cluster's changes."""
        try:
            authorization = ctx.request_headers.getall("authorization")
            identity, expires = await self._auth.authenticate_until(authorization)
            message = _decode(request, MultiWatchRequest())
            stream = self._watcher.stream(identity, message, request.codec, expires=expires)
        except Exception as exc:
            raise _translate(exc) from None
        try:
            async for data in stream:
                yield RawMessage(data, request.codec)
        except Exception as exc:
            raise _translate(exc) from None
        finally:
            await stream.aclose()


def _decode(request: RawMessage, message: Message) -> Any:
    try:
        wire.decode(request.data, message, request.codec)
    except (DecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else "cannot be decoded"
        raise InvalidFanoutRequestError(
            f"the request is not a valid {type(message).__name__}: {reason}"
        ) from None
    return message


def status_details(statuses: Sequence[ClusterStatus]) -> list[ErrorDetail]:
    """``statuses`` as Connect error details (``google.protobuf.Any`` of ClusterStatus)."""
    type_url = "type.googleapis.com/" + ClusterStatus.DESCRIPTOR.full_name
    return [
        ErrorDetail(AnyMessage(type_url=type_url, value=status.SerializeToString())) for status in statuses
    ]


def _translate(exc: BaseException) -> ConnectError:
    if isinstance(exc, RequireAllError):
        return ConnectError(
            Code.FAILED_PRECONDITION, str(exc), details=status_details(getattr(exc, "details", ()))
        )
    if isinstance(exc, ConnectError | OtterscaleError):
        return to_connect_error(exc)
    call = current_call()
    request_id = call.request_id if call is not None else None
    logger.error("unexpected error in a fan-out call (request id %s)", request_id, exc_info=exc)
    return to_connect_error(exc, request_id=request_id)
