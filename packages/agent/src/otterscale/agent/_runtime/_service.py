"""RuntimeService on the agent: logs, exec, port-forward, scale and restart, as the verified caller.

Handlers validate the request, check the cluster, and act through the concept modules: pods and
permissions (``_pods``), logs (``_logs``), sessions (``_sessions``, ``_input``), the Kubernetes
WebSockets (``_connection``, ``_channel``), workloads (``_workloads``). They raise only the
agent's own errors; the agent's ErrorBoundary turns them into Connect errors.

A session (ExecuteTTY, PortForward) is counted before Kubernetes is asked anything, announced to
the client (``session_id``) only once the Kubernetes stream is open, findable by writes only
from then on, and closed whatever ends the stream: the process exits or the pod closes the
connection (OK), Kubernetes or the tunnel breaks (unavailable), the client goes away
(cancelled), the idle timeout or lifetime (deadline_exceeded), the agent stops (unavailable).
One audit record is written when it starts and one when it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf import empty_pb2  # type: ignore[import-untyped]  # no stubs for protobuf 7

from otterscale.common import AuditLog, Identity, RuntimeConfig
from otterscale.runtime.v1 import runtime_pb2 as pb

from .._auth import current_identity
from .._discovery import DiscoveryCache
from .._errors import (
    AgentError,
    InvalidRequestError,
    PermissionDeniedError,
    PreconditionError,
    SessionLimitError,
    ShuttingDownError,
    StreamUnavailableError,
    UnknownClusterError,
    status_code,
)
from .._kube import KubeClient
from .._metrics import AgentMetrics
from .._tasks import start_task, stop_tasks
from ._audit import SessionAudit
from ._channel import ERROR, EXEC_PROTOCOLS, PORT_FORWARD_PROTOCOLS, STDERR, STDOUT, ExitStatus, exit_status
from ._connection import ExecConnection, PortForwardConnection, Resizer
from ._input import OrderedInput
from ._logs import LogOptions, follow_logs
from ._pods import choose_container, command_params, get_pod, pod_path, require_access, require_running
from ._pump import Pump
from ._sessions import Session, SessionKind, SessionRegistry, session_events
from ._workloads import Workloads

logger = logging.getLogger(__name__)

__all__ = ["RuntimeServiceImpl"]

_MAX_DIMENSION = 65535
#: Events of the session cores (besides the output channels STDOUT and STDERR).
_STARTED, _HEARTBEAT, _EXITED, _DATA = "started", "heartbeat", "exited", "data"
#: Most bytes of the kubelet's port-forward error text kept.
_MAX_ERROR_TEXT = 4096


def _require(value: str, field: str) -> str:
    if not value:
        raise InvalidRequestError(f"{field} is required")
    return value


def _code_of(exc: BaseException) -> str:
    """How a session ended, for its audit record and metrics (a Connect code name)."""
    if isinstance(exc, AgentError | ConnectError):
        return str(exc.code.value)
    if isinstance(exc, Exception):
        return Code.INTERNAL.value
    return Code.CANCELED.value  # the client went away (CancelledError, GeneratorExit)


class RuntimeServiceImpl:
    """The agent's RuntimeService (the generated ``RuntimeService`` protocol)."""

    def __init__(
        self,
        *,
        cluster: str,
        client: KubeClient,
        discovery: DiscoveryCache,
        config: RuntimeConfig,
        metrics: AgentMetrics,
        audit: AuditLog,
    ) -> None:
        self._cluster = cluster
        self._client = client
        self._config = config
        self._metrics = metrics
        self._audit = SessionAudit(audit, cluster=cluster, argv_policy=config.audit_argv)
        self.sessions = SessionRegistry(cluster, config, metrics)
        self._workloads = Workloads(client, discovery)
        self._logs: set[Pump[str]] = set()
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """End every session and log stream with unavailable; refuse new ones."""
        self._closing = True
        self.sessions.shutdown()
        for pump in list(self._logs):
            pump.stop(ShuttingDownError("the agent is shutting down; open the log again"))

    def _check_cluster(self, cluster: str) -> None:
        if cluster and cluster != self._cluster:
            raise UnknownClusterError(f'this agent serves cluster "{self._cluster}", not "{cluster}"')

    def _track_log(self, pump: Pump[str], running: bool) -> None:
        if running:
            self._logs.add(pump)
            self._metrics.log_streams_active.inc()
        else:
            self._logs.discard(pump)
            self._metrics.log_streams_active.dec()

    # --- PodLog ------------------------------------------------------------------------------

    async def pod_log(
        self, request: pb.PodLogRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.PodLogResponse]:
        caller = current_identity()
        self._check_cluster(request.cluster)
        _require(request.namespace, "namespace")
        _require(request.name, "name")
        options = LogOptions(
            follow=request.follow,
            previous=request.previous,
            timestamps=request.timestamps,
            tail_lines=request.tail_lines if request.HasField("tail_lines") else None,
            since_seconds=request.since_seconds if request.HasField("since_seconds") else None,
            since_time=(
                request.since_time.ToDatetime(tzinfo=datetime.UTC) if request.HasField("since_time") else None
            ),
            limit_bytes=request.limit_bytes if request.HasField("limit_bytes") else None,
        )
        options.check()
        if request.all_containers and request.container:
            raise InvalidRequestError("give container or all_containers, not both")
        if self._closing:
            raise ShuttingDownError("the agent is shutting down; open the log again")
        pod = await get_pod(self._client, caller, request.namespace, request.name)
        containers = (
            pod.all_containers if request.all_containers else [choose_container(pod, request.container)]
        )
        async for chunk in follow_logs(
            self._client,
            caller,
            namespace=request.namespace,
            pod=request.name,
            containers=containers,
            options=options,
            heartbeat=self._config.heartbeat_seconds,
            on_pump=self._track_log,
        ):
            yield pb.PodLogResponse(data=chunk.data, container=chunk.container)

    # --- ExecuteTTY / WriteTTY / ResizeTTY -----------------------------------------------------

    async def execute_tty(
        self, request: pb.ExecuteTTYRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.ExecuteTTYResponse]:
        core = self._exec(current_identity(), request, _Call.of(ctx), findable=True)
        try:
            async for kind, value in core:
                if kind == _STARTED:
                    yield pb.ExecuteTTYResponse(session_id=value.id)
                elif kind == _HEARTBEAT:
                    yield pb.ExecuteTTYResponse()
                elif kind == STDOUT:
                    yield pb.ExecuteTTYResponse(stdout=value)
                elif kind == STDERR:
                    yield pb.ExecuteTTYResponse(stderr=value)
                else:
                    yield pb.ExecuteTTYResponse(exit_code=value.exit_code, message=value.message)
        finally:
            await core.aclose()

    async def exec(
        self, requests: AsyncIterator[pb.ExecRequest], ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.ExecResponse]:
        caller = current_identity()
        first = await _first_message(requests)
        core = self._exec(caller, first.start, _Call.of(ctx), findable=False)
        feeder: asyncio.Task[None] | None = None
        try:
            async for kind, value in core:
                if kind == _STARTED:
                    feeder = start_task(
                        self._feed_exec(requests, value),
                        name=f"runtime-exec-input-{value.ref}",
                        forever=False,
                    )
                    yield pb.ExecResponse()
                elif kind == _HEARTBEAT:
                    yield pb.ExecResponse()
                elif kind == STDOUT:
                    yield pb.ExecResponse(stdout=value)
                elif kind == STDERR:
                    yield pb.ExecResponse(stderr=value)
                else:
                    yield pb.ExecResponse(exit_code=value.exit_code, message=value.message)
        finally:
            if feeder is not None:
                await stop_tasks([feeder], grace=2.0)
            await core.aclose()

    async def _feed_exec(self, requests: AsyncIterator[pb.ExecRequest], session: Session) -> None:
        """Apply an Exec stream's messages to the session, in order; a failure ends the session."""
        try:
            async for message in requests:
                which = message.WhichOneof("message")
                if which == "stdin":
                    if session.input is None:
                        raise PreconditionError("the session was started without stdin (stdin: false)")
                    await self._write(session, message.stdin, None, False)
                elif which == "close_stdin" and message.close_stdin:
                    if session.input is None:
                        raise PreconditionError("the session was started without stdin (stdin: false)")
                    if not session.can_close:
                        raise PreconditionError(session.close_refusal)
                    await self._write(session, b"", None, True)
                elif which == "resize":
                    await self._resize(session, message.resize.rows, message.resize.cols)
                elif which == "start":
                    raise InvalidRequestError(
                        "start must be the first message of an Exec stream, and only it"
                    )
        except AgentError as exc:
            session.end(exc)
        except ConnectError as exc:  # the request stream broke (the client reset it)
            session.end(StreamUnavailableError(f"the Exec request stream broke: {exc.message}"))

    async def _exec(
        self, caller: Identity, request: pb.ExecuteTTYRequest, call: _Call, *, findable: bool
    ) -> AsyncGenerator[tuple[Any, Any], None]:
        """One exec session from start to end, as events: (_STARTED, session), (_HEARTBEAT,
        None), (STDOUT or STDERR, bytes), and last (_EXITED, ExitStatus) when the command exited.

        Checks, limits, audit and clean-up are here, for ExecuteTTY and Exec alike; with
        ``findable`` the session can be reached by its id (WriteTTY, ResizeTTY).
        """
        self._check_cluster(request.cluster)
        _require(request.namespace, "namespace")
        _require(request.name, "name")
        if not request.command:
            raise InvalidRequestError('command is required, e.g. ["/bin/sh"]')
        size = _initial_size(request)
        with_stdin = request.stdin if request.HasField("stdin") else True
        session = self.sessions.open(SessionKind.EXEC, caller, namespace=request.namespace, pod=request.name)
        session.command = tuple(request.command)
        session.tty = request.tty
        started = False
        outcome = "ok"
        exit_code: int | None = None
        pump: Pump[str] | None = None
        connection: ExecConnection | None = None
        try:
            pod = await get_pod(self._client, caller, request.namespace, request.name)
            # Permission first: a caller who may not exec learns nothing more about the pod.
            await self._require_access(caller, SessionKind.EXEC, "exec", request.namespace, request.name)
            session.container = choose_container(pod, request.container)
            require_running(pod, "exec into")
            params = [("container", session.container), *command_params(request.command), ("stdout", "true")]
            if with_stdin:
                params.append(("stdin", "true"))
            params.append(("tty", "true") if request.tty else ("stderr", "true"))
            ws = await self._client.websocket(
                pod_path(request.namespace, request.name, "exec"),
                params=params,
                protocols=EXEC_PROTOCOLS,
                caller=caller,
            )
            try:
                connection = ExecConnection(ws, session)
            except BaseException:
                await ws.close()
                raise
            session.can_close = connection.can_close_stdin
            session.close_refusal = connection.close_refusal
            if request.tty:
                resizer = Resizer(connection)
                session.resizer = resizer
                if size is not None:
                    await resizer(*size)
            if with_stdin:
                session.input = self._input(session, connection.write_stdin, "stdin")
            pump = Pump({"exec": connection.frames()}, name=f"runtime-exec-{session.ref}")
            session.abort = pump.stop
            session.ready = findable
            started = True
            self._audit.start(session, verb=call.verb, headers=call.headers)
            yield _STARTED, session
            status: ExitStatus | None = None
            async for event in session_events(session, pump, self._config, self._metrics):
                if event is None:
                    yield _HEARTBEAT, None
                    continue
                channel, payload = event
                if not payload:
                    continue  # the API server opens each channel with an empty message
                if channel in (STDOUT, STDERR):
                    session.bytes_out += len(payload)
                    yield channel, payload
                elif channel == ERROR:
                    # The last word: the server sends it once output is complete, then closes.
                    status = exit_status(payload)
                    break
            if session.end_reason is not None:
                raise session.end_reason
            if status is None:
                raise StreamUnavailableError(
                    "the exec stream ended without an exit status (the connection to the pod was lost)"
                )
            if status.exit_code is None:
                raise _exec_failure(status)
            exit_code = status.exit_code
            yield _EXITED, status
        except BaseException as exc:
            outcome = _code_of(exc)
            raise
        finally:
            await self._end_session(session, pump, connection.ws if connection else None)
            if started:
                self._ended(session, call, outcome, exit_code)

    async def write_tty(
        self, request: pb.WriteTTYRequest, ctx: RequestContext[Any, Any], /
    ) -> empty_pb2.Empty:
        session = self.sessions.find(request.session_id, current_identity(), SessionKind.EXEC)
        if session.input is None:
            raise PreconditionError("the session was started without stdin (stdin: false)")
        if request.close_stdin and session.can_close is False:
            raise PreconditionError(session.close_refusal)
        await self._write(
            session,
            request.stdin,
            request.offset if request.HasField("offset") else None,
            request.close_stdin,
        )
        return empty_pb2.Empty()

    async def resize_tty(
        self, request: pb.ResizeTTYRequest, ctx: RequestContext[Any, Any], /
    ) -> empty_pb2.Empty:
        _check_size(request.rows, request.cols)
        session = self.sessions.find(request.session_id, current_identity(), SessionKind.EXEC)
        await self._resize(session, request.rows, request.cols)
        return empty_pb2.Empty()

    async def _resize(self, session: Session, rows: int, cols: int) -> None:
        _check_size(rows, cols)
        if session.resizer is None:
            raise PreconditionError(
                "the session has no terminal (started with tty false); it cannot be resized"
            )
        session.touch()
        await session.resizer(rows, cols)

    # --- PortForward / WritePortForward -------------------------------------------------------

    async def port_forward(
        self, request: pb.PortForwardRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.PortForwardResponse]:
        core = self._port_forward(current_identity(), request, _Call.of(ctx), findable=True)
        try:
            async for kind, value in core:
                if kind == _STARTED:
                    yield pb.PortForwardResponse(session_id=value.id)
                elif kind == _HEARTBEAT:
                    yield pb.PortForwardResponse()
                else:
                    yield pb.PortForwardResponse(data=value)
        finally:
            await core.aclose()

    async def port_forward_stream(
        self, requests: AsyncIterator[pb.PortForwardStreamRequest], ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.PortForwardStreamResponse]:
        caller = current_identity()
        first = await _first_message(requests)
        core = self._port_forward(caller, first.start, _Call.of(ctx), findable=False)
        feeder: asyncio.Task[None] | None = None
        try:
            async for kind, value in core:
                if kind == _STARTED:
                    feeder = start_task(
                        self._feed_port_forward(requests, value),
                        name=f"runtime-port-forward-input-{value.ref}",
                        forever=False,
                    )
                    yield pb.PortForwardStreamResponse()
                elif kind == _HEARTBEAT:
                    yield pb.PortForwardStreamResponse()
                else:
                    yield pb.PortForwardStreamResponse(data=value)
        finally:
            if feeder is not None:
                await stop_tasks([feeder], grace=2.0)
            await core.aclose()

    async def _feed_port_forward(
        self, requests: AsyncIterator[pb.PortForwardStreamRequest], session: Session
    ) -> None:
        """Send a PortForwardStream's bytes to the pod, in order; a failure ends the session."""
        try:
            async for message in requests:
                if message.WhichOneof("message") == "start":
                    raise InvalidRequestError(
                        "start must be the first message of a PortForwardStream, and only it"
                    )
                if message.data:
                    await self._write(session, message.data, None, False)
        except AgentError as exc:
            session.end(exc)
        except ConnectError as exc:
            session.end(StreamUnavailableError(f"the PortForwardStream request stream broke: {exc.message}"))

    async def _port_forward(
        self, caller: Identity, request: pb.PortForwardRequest, call: _Call, *, findable: bool
    ) -> AsyncGenerator[tuple[Any, Any], None]:
        """One port-forward session as events: (_STARTED, session), (_HEARTBEAT, None), and
        (_DATA, bytes); checks, limits, audit and clean-up for PortForward and
        PortForwardStream alike (``findable``: reachable by its id, for WritePortForward)."""
        self._check_cluster(request.cluster)
        _require(request.namespace, "namespace")
        _require(request.name, "name")
        if not 1 <= request.port <= _MAX_DIMENSION:
            raise InvalidRequestError(f"port must be between 1 and 65535, got {request.port}")
        session = self.sessions.open(
            SessionKind.PORT_FORWARD, caller, namespace=request.namespace, pod=request.name
        )
        session.port = request.port
        started = False
        outcome = "ok"
        pump: Pump[str] | None = None
        ws = None
        try:
            pod = await get_pod(self._client, caller, request.namespace, request.name)
            await self._require_access(
                caller, SessionKind.PORT_FORWARD, "portforward", request.namespace, request.name
            )
            require_running(pod, "forward a port of")
            ws = await self._client.websocket(
                pod_path(request.namespace, request.name, "portforward"),
                params=[("ports", str(request.port))],
                protocols=PORT_FORWARD_PROTOCOLS,
                caller=caller,
            )
            connection = PortForwardConnection(ws, session, request.port)
            session.input = self._input(session, connection.write, "data")
            session.can_close = False
            session.close_refusal = PortForwardConnection.CLOSE_REFUSAL
            pump = Pump({"port-forward": connection.frames()}, name=f"runtime-port-forward-{session.ref}")
            session.abort = pump.stop
            session.ready = findable
            started = True
            self._audit.start(session, verb=call.verb, headers=call.headers)
            yield _STARTED, session
            errors = bytearray()
            async for event in session_events(session, pump, self._config, self._metrics):
                if event is None:
                    yield _HEARTBEAT, None
                    continue
                channel, payload = event
                if not payload:
                    continue
                if channel == PortForwardConnection.DATA:
                    session.bytes_out += len(payload)
                    yield _DATA, payload
                elif len(errors) < _MAX_ERROR_TEXT:
                    errors += payload[: _MAX_ERROR_TEXT - len(errors)]
            if session.end_reason is not None:
                raise session.end_reason
            if errors:
                raise _port_forward_failure(errors.decode("utf-8", "replace").strip())
        except BaseException as exc:
            outcome = _code_of(exc)
            raise
        finally:
            await self._end_session(session, pump, ws)
            if started:
                self._ended(session, call, outcome, None)

    async def write_port_forward(
        self, request: pb.WritePortForwardRequest, ctx: RequestContext[Any, Any], /
    ) -> empty_pb2.Empty:
        session = self.sessions.find(request.session_id, current_identity(), SessionKind.PORT_FORWARD)
        if request.close_write and session.can_close is False:
            raise PreconditionError(session.close_refusal)
        await self._write(
            session, request.data, request.offset if request.HasField("offset") else None, request.close_write
        )
        return empty_pb2.Empty()

    # --- Scale / GetScale / Restart ------------------------------------------------------------

    async def scale(self, request: pb.ScaleRequest, ctx: RequestContext[Any, Any], /) -> pb.ScaleResponse:
        self._check_cluster(request.cluster)
        before, after = await self._workloads.scale(
            current_identity(),
            group=request.group,
            version=request.version,
            resource=request.resource,
            namespace=request.namespace,
            name=_require(request.name, "name"),
            replicas=request.replicas,
            current_replicas=request.current_replicas if request.HasField("current_replicas") else None,
        )
        return pb.ScaleResponse(
            replicas=after.replicas,
            previous_replicas=before.replicas,
            status_replicas=after.status_replicas,
            selector=after.selector,
        )

    async def get_scale(
        self, request: pb.GetScaleRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.ScaleResponse:
        self._check_cluster(request.cluster)
        state = await self._workloads.get_scale(
            current_identity(),
            group=request.group,
            version=request.version,
            resource=request.resource,
            namespace=request.namespace,
            name=_require(request.name, "name"),
        )
        return pb.ScaleResponse(
            replicas=state.replicas,
            previous_replicas=state.replicas,
            status_replicas=state.status_replicas,
            selector=state.selector,
        )

    async def restart(self, request: pb.RestartRequest, ctx: RequestContext[Any, Any], /) -> empty_pb2.Empty:
        self._check_cluster(request.cluster)
        await self._workloads.restart(
            current_identity(),
            group=request.group,
            version=request.version,
            resource=request.resource,
            namespace=request.namespace,
            name=_require(request.name, "name"),
        )
        return empty_pb2.Empty()

    # --- helpers -----------------------------------------------------------------------------

    async def _require_access(
        self, caller: Identity, kind: SessionKind, subresource: str, namespace: str, name: str
    ) -> None:
        try:
            await require_access(
                self._client,
                caller,
                resource="pods",
                subresource=subresource,
                namespace=namespace,
                name=name,
            )
        except PermissionDeniedError:
            self._metrics.refusals.labels(kind=kind.value, reason="access_denied").inc()
            raise

    def _input(self, session: Session, sink: Any, what: str) -> OrderedInput:
        return OrderedInput(
            sink,
            max_pending=self._config.max_pending_bytes,
            gap_timeout=self._config.write_gap_timeout_seconds,
            what=what,
        )

    async def _write(self, session: Session, data: bytes, offset: int | None, close: bool) -> None:
        kind = session.kind.value
        if len(data) > self._config.max_write_bytes:
            self._metrics.refusals.labels(kind=kind, reason="write_too_large").inc()
            raise SessionLimitError(
                f"one write carries {len(data)} bytes; at most {self._config.max_write_bytes} "
                "(runtime.max_write_bytes): split it"
            )
        assert session.input is not None
        before = session.bytes_in
        try:
            await session.input.write(data, offset, close)
        except SessionLimitError:
            self._metrics.refusals.labels(kind=kind, reason="pending_input").inc()
            raise
        except AgentError as exc:
            if exc.code is Code.ABORTED:
                self._metrics.refusals.labels(kind=kind, reason="input_gap").inc()
            raise
        finally:
            self._metrics.session_bytes.labels(kind=kind, direction="in").inc(session.bytes_in - before)
        session.touch()

    async def _end_session(self, session: Session, pump: Pump[str] | None, ws: Any) -> None:
        self.sessions.close(session)
        if pump is not None:
            await pump.close()
        if ws is not None:
            await ws.close()
        self._metrics.session_bytes.labels(kind=session.kind.value, direction="out").inc(session.bytes_out)

    def _ended(self, session: Session, call: _Call, outcome: str, exit_code: int | None) -> None:
        duration = time.monotonic() - session.started
        self._metrics.session_seconds.labels(kind=session.kind.value, code=outcome).observe(duration)
        self._audit.end(session, verb=call.verb, headers=call.headers, code=outcome, exit_code=exit_code)


@dataclasses.dataclass(frozen=True, slots=True)
class _Call:
    """What the audit needs of the RPC that runs a session: its name and request headers."""

    verb: str
    headers: Mapping[str, str]

    @classmethod
    def of(cls, ctx: RequestContext[Any, Any]) -> _Call:
        request_id = ctx.request_headers.get("x-request-id", "")
        return cls(ctx.method.name, {"x-request-id": request_id} if request_id else {})


def _check_size(rows: int, cols: int) -> None:
    for field, value in (("rows", rows), ("cols", cols)):
        if not 1 <= value <= _MAX_DIMENSION:
            raise InvalidRequestError(f"{field} must be between 1 and {_MAX_DIMENSION}, got {value}")


async def _first_message(requests: AsyncIterator[Any]) -> Any:
    """The first message of a request stream, which must carry ``start``."""
    try:
        first = await anext(requests)
    except StopAsyncIteration:
        raise InvalidRequestError("the stream ended before its first message (start)") from None
    if first.WhichOneof("message") != "start":
        raise InvalidRequestError("the first message of the stream must carry start")
    return first


def _initial_size(request: pb.ExecuteTTYRequest) -> tuple[int, int] | None:
    """(rows, cols) to set first: both given and non-zero (0 means unknown, as in the original)."""
    for field in ("rows", "cols"):
        value = getattr(request, field)
        if value > _MAX_DIMENSION:
            raise InvalidRequestError(f"{field} must be between 1 and {_MAX_DIMENSION}, got {value}")
    if request.tty and request.rows and request.cols:
        return request.rows, request.cols
    return None


def _exec_failure(status: ExitStatus) -> AgentError:
    """The error for a Status on the error channel that is not an exit code.

    The API server's stream translator reports a failure of the kubelet or runtime to run the
    command (no such container, container not running) as an InternalError Status: that is not
    the agent's internal error, but the pod not being able to run it right now (unavailable,
    with the kubelet's message).
    """
    code = status_code(status.reason, status.http_code)
    if code is Code.INTERNAL:
        return StreamUnavailableError(status.message)
    error = AgentError(status.message)
    error.code = code
    return error


def _port_forward_failure(text: str) -> AgentError:
    """The kubelet's error text: nothing listening is failed_precondition, the rest unavailable."""
    if "refused" in text.lower():
        return PreconditionError(text)
    return StreamUnavailableError(text)
