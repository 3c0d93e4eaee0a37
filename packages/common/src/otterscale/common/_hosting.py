"""The service inside Envoy: start-up, drain and stop, and the one ASGI wrapper both services use.

pyvoy imports ``otterscale.hub._hosted:app`` (or the agent's) inside Envoy; that object is
:func:`host` applied to the service's factory. It reads the settings the launcher handed over
(``OTTERSCALE_SERVE``, see :mod:`._launch`) and:

- **start-up** (ASGI lifespan, which pyvoy runs before Envoy serves): logging as asked, the
  service built by its factory (which reads and validates ``otterscale.yaml``) and started, the
  routes file written (Envoy gives streaming methods an idle timeout, see
  :func:`~._envoy.route_config`), then "started" on the status pipe. A failure is reported on the
  status pipe (the launcher prints it) and ends the process: nothing half-started keeps running.
  Python's cyclic garbage collector is paused from the moment this module loads inside Envoy
  (the service's modules load right after it) until start-up is over: its passes over the roughly
  100,000 long-lived objects start-up makes were 10 to 35 % of the imports' time (both services,
  loaded 2-core machine). What start-up made is then frozen (``gc.freeze()``), so that full
  collections skip it; the roughly 2,000 objects of cyclic garbage start-up leaves stay. (A larger
  collection threshold for the whole run was measured on the agent and withdrawn: 10 % off a
  5,000-object List, but cyclic garbage then outlives busy periods with whatever it holds.);
- **drain** (``drain`` on the control pipe, end of file on it, or a root task of the service
  ending): the service stops being ready and ends its streams, Envoy's listener drains (HTTP/1.1
  ``connection: close``, HTTP/2 GOAWAY), calls in flight get up to the drain timeout, Envoy
  finishes writing their answers (and clients get up to half a second to read them), then the
  process sends itself SIGTERM: Envoy closes what is left and runs the lifespan shutdown;
- **shutdown**: the service's ``stop()``, bounded by the stop budget; a watchdog thread ends the
  process if even that hangs (neither pyvoy nor Envoy bounds a lifespan shutdown).

Every request passes through one wrapper (:class:`_Exchange`) that carries what pyvoy 1.3.0 needs
and what both services want:

- pyvoy raises one shared ``ClientDisconnectedError`` instance when the client is gone, whose
  traceback grows with every raise and keeps every frame it passed alive (3 to 7 KB per cut
  stream, for good): the wrapper drops that traceback and raises a fresh :class:`ClientGone` (a
  ``canceled`` Connect error), which ends the request quietly at the top;
- pyvoy resolves futures the application has already cancelled, and asyncio logs each such
  ``InvalidStateError`` at error level (about one per cancelled call): a loop exception handler
  counts them instead;
- once a request's body has been delivered, pyvoy's ``receive()`` answers at once with another
  empty body instead of waiting for the client to go away: for a request without a body the
  answer does not even yield to the event loop, so connectrpc's disconnect watch (which calls
  ``receive()`` until it sees ``http.disconnect``) froze the whole service for as long as such a
  call was in flight, and spun a core for every other one. The wrapper delivers the body's end
  once and then makes ``receive()`` wait; one poller (:class:`_Disconnects`) asks pyvoy, for
  every request waiting so, twice a second whether its client is gone;
- pyvoy never resets a stream whose client stopped reading: streaming responses get an empty
  body chunk whenever they have been quiet for a third of the send timeout, which keeps Envoy's
  idle timeout (on those routes only) from cutting quiet healthy streams, while a client that
  reads nothing blocks these too and is reset by Envoy;
- a deadline for a request's whole body (``limits.request_timeout_seconds``) on every route whose
  request is one message; past it the call is refused with resource_exhausted in the caller's
  protocol (the body is never read further; Envoy then resets the stream or closes the HTTP/1.1
  connection), counted, and summarised in the log at most once a minute;
- ``Content-Length`` on one-message answers (:func:`with_content_length`), requests sent to the
  API or the management application by the local port they arrived on, an exception that
  escapes the application logged as ours (pyvoy would print a raw traceback) and answered 500.

Nothing here logs a header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from ._asgi import ASGIApp, Receive, Send, with_content_length
from ._envoy import STREAM_RESET_MARGIN, ListenerLimits, route_config, write_json
from ._errors import OtterscaleError
from ._launch import SETTINGS_ENV, STARTUP_FAILED, admin_request, listener_addresses, process_age
from ._logging import configure_logging

logger = logging.getLogger(__name__)


#: When the service's modules started to load, as seconds since Envoy started (start-up report).
_LOADING = process_age()
_LOADING_AT = time.monotonic()
#: Inside Envoy (the launcher set the settings), the collector pauses until start-up is over.
_START_UP_WITHOUT_COLLECTOR = SETTINGS_ENV in os.environ
if _START_UP_WITHOUT_COLLECTOR:
    gc.disable()

#: The ``reason`` a service counts a request refused for its body deadline under.
REQUEST_TIMEOUT = "request_timeout"
#: At most one summary line of refused requests per this many seconds.
SUMMARY_SECONDS = 60.0
#: How long a drain waits at least, once the application has no call left, for Envoy to finish
#: writing the last answers, and how long it then lingers while clients still hold connections
#: (see ``_Host._envoy_done``).
ENVOY_FLUSH_SECONDS = 1.0
ENVOY_LINGER_SECONDS = 0.5
#: How often pyvoy is asked whether the client of a request whose body has arrived is gone.
DISCONNECT_POLL_SECONDS = 0.5


class ClientGone(ConnectError):
    """The client went away while the service was answering (a fresh instance every time).

    A ``canceled`` Connect error, because that is what it is to everything between the send that
    failed and the top of the request: connectrpc hands it to the interceptors' ``on_end``, so the
    call is counted, logged and audited as ``canceled``, like a client that left while the
    service was waiting (an ``Exception`` of its own was counted ``unknown`` and logged as a
    failure whenever the client left between a disconnect poll and the next message).
    """

    def __init__(self) -> None:
        super().__init__(Code.CANCELED, "the client went away")


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """What the launcher handed over (see :mod:`._launch`)."""

    name: str
    service: Mapping[str, Any]
    control_fd: int
    status_fd: int
    admin_socket: Path
    routes_file: Path
    api: tuple[str, int]
    management: tuple[str, int] | None
    limits: ListenerLimits
    drain_timeout: float
    stop_timeout: float
    log_level: str
    log_format: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        """Read :data:`~._launch.SETTINGS_ENV`; raise RuntimeError when it is missing."""
        text = (os.environ if environ is None else environ).get(SETTINGS_ENV)
        if not text:
            raise RuntimeError(f"{SETTINGS_ENV} is not set: start the service with its command, not pyvoy")
        raw = json.loads(text)
        management = raw.get("management")
        return cls(
            name=str(raw["name"]),
            service=dict(raw.get("service") or {}),
            control_fd=int(raw["control_fd"]),
            status_fd=int(raw["status_fd"]),
            admin_socket=Path(raw["admin_socket"]),
            routes_file=Path(raw["routes_file"]),
            api=(str(raw["api"][0]), int(raw["api"][1])),
            management=(str(management[0]), int(management[1])) if management else None,
            limits=ListenerLimits(**raw["limits"]),
            drain_timeout=float(raw["drain_timeout"]),
            stop_timeout=float(raw["stop_timeout"]),
            log_level=str(raw["log_level"]),
            log_format=str(raw["log_format"]),
        )


class Service(Protocol):
    """The service's lifecycle, as the host drives it."""

    async def start(self) -> None:
        """Start the background work (tunnels, probes, election); raise if the service cannot."""

    def drain(self) -> None:
        """A stop begins: stop being ready, refuse new streams, end the open ones (no waiting)."""

    async def stop(self) -> None:
        """Stop everything (after serving ended); bounded and idempotent."""

    async def failed(self) -> str:
        """Return, with a reason, only when the service can no longer serve (a root task ended)."""


@dataclass(slots=True)
class Hosted:
    """A service and how to serve it, as its factory returns it."""

    service: Service
    #: The API (the address of ``--address``).
    api: ASGIApp
    #: The limits the validated configuration asks Envoy for (checked against what it got).
    limits: ListenerLimits
    #: ``/metrics`` and the per-cluster health (``--management-address``); None: no such listener.
    management: ASGIApp | None = None
    #: Procedures whose answer is a stream (heartbeats; Envoy resets them when stalled).
    streaming: frozenset[str] = frozenset()
    #: Procedures whose request is a stream (no body deadline: a client stream may be long).
    request_streaming: frozenset[str] = frozenset()
    #: Seconds a streamed answer may wait for its client (the service's own send timeout).
    stream_send_timeout: float | None = None
    #: Counts a refusal by reason (``request_timeout``).
    on_refused: Callable[[str], None] = field(default=lambda reason: None)


Factory = Callable[[ServeSettings], Awaitable[Hosted]]


def streaming_methods(services: Iterable[Any]) -> tuple[frozenset[str], frozenset[str]]:
    """The procedures (``/<package>.<Service>/<Method>``) of ``services`` (protobuf service
    descriptors) whose answers stream, and those whose requests stream."""
    answers: set[str] = set()
    requests: set[str] = set()
    for service in services:
        for method in service.methods:
            procedure = f"/{service.full_name}/{method.name}"
            if method.server_streaming:
                answers.add(procedure)
            if method.client_streaming:
                requests.add(procedure)
    return frozenset(answers), frozenset(requests)


def host(factory: Factory) -> ASGIApp:
    """The ASGI application pyvoy serves: ``factory``'s service, started, drained and stopped."""
    return _Host(factory, loaded=time.monotonic())


class _Host:
    def __init__(self, factory: Factory, *, loaded: float) -> None:
        self._factory = factory
        self._loaded = loaded
        self._settings: ServeSettings | None = None
        self._hosted: Hosted | None = None
        self._ports: dict[int, ASGIApp] = {}
        self._ports_known: asyncio.Future[None] | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._refusals = _Summary()
        self.disconnects = _Disconnects()
        self.invalid_state_errors = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # ----------------------------------------------------------------------------------------------
    # Lifespan

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _startup(self) -> None:
        began = time.monotonic()
        settings = self._settings = ServeSettings.from_environ()
        configure_logging(settings.log_level, settings.log_format)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        try:
            hosted = await self._factory(settings)
            built = time.monotonic()
            if hosted.limits != settings.limits:
                raise OtterscaleError(
                    "the limits Envoy was started with differ from the configuration's "
                    f"({settings.limits} != {hosted.limits}): was otterscale.yaml changed during start-up?"
                )
            await hosted.service.start()
        except Exception as exc:  # every failure ends here, reported, then the process ends
            self._startup_failed(exc)
        self._hosted = hosted
        send_timeout = hosted.stream_send_timeout
        write_json(
            settings.routes_file,
            route_config(
                hosted.streaming,
                stream_idle_timeout=send_timeout + STREAM_RESET_MARGIN if send_timeout else None,
            ),
        )
        self._ports_known = loop.create_future()
        if settings.api[1] and (settings.management is None or settings.management[1]):
            self._set_ports(settings.api[1], settings.management[1] if settings.management else None)
        else:  # a port chosen by the kernel: Envoy's admin tells once it serves
            self._tasks.append(asyncio.create_task(self._learn_ports(), name="serve-ports"))
        self._tasks.append(asyncio.create_task(self._watch_failure(hosted.service), name="serve-failure"))
        os.set_blocking(settings.control_fd, False)
        loop.add_reader(settings.control_fd, self._on_control)
        done = time.monotonic()
        # Where start-up went, in milliseconds: Envoy and Python until the service's modules began
        # to load, loading them, the configuration and the service's objects, starting the service.
        timings = {
            "envoy_python": round(_LOADING * 1000) if _LOADING is not None else None,
            "imports": round((self._loaded - _LOADING_AT) * 1000),
            "configuration": round((built - began) * 1000),
            "service": round((done - built) * 1000),
        }
        if _START_UP_WITHOUT_COLLECTOR:
            gc.freeze()
            gc.enable()
        self._report({"event": "started", "timings": timings})

    def _startup_failed(self, exc: Exception) -> NoReturn:
        if isinstance(exc, OtterscaleError):
            message = str(exc)
        else:
            logger.error("the %s could not start", self._name, exc_info=exc)
            message = f"cannot start: {type(exc).__name__}: {exc}"
        self._report({"event": "failed", "message": message})
        sys.stderr.flush()
        # Ending here keeps Envoy from serving a service that did not start (and from logging
        # the failure again in its own format).
        os._exit(STARTUP_FAILED)

    async def _shutdown(self) -> None:
        settings = self._settings
        stop_timeout = settings.stop_timeout if settings is not None else 15.0
        watchdog = threading.Timer(stop_timeout + 2.0, self._hard_exit, args=(stop_timeout + 2.0,))
        watchdog.daemon = True
        watchdog.start()
        if settings is not None:
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(settings.control_fd)
        for task in self._tasks:
            task.cancel()
        hosted = self._hosted
        if hosted is not None:
            hosted.service.drain()
            try:
                await asyncio.wait_for(hosted.service.stop(), stop_timeout)
            except TimeoutError:
                logger.error("the %s did not stop within %gs", self._name, stop_timeout)
        if self.invalid_state_errors:
            logger.debug("pyvoy resolved %d cancelled futures (ignored)", self.invalid_state_errors)

    @staticmethod
    def _hard_exit(after: float) -> None:
        logger.error("shutdown hung for %gs; exiting", after)
        sys.stderr.flush()
        os._exit(1)

    @property
    def _name(self) -> str:
        return self._settings.name if self._settings is not None else "service"

    def _report(self, message: Mapping[str, Any]) -> None:
        settings = self._settings
        if settings is None:
            return
        with contextlib.suppress(OSError):
            os.write(settings.status_fd, json.dumps(message).encode() + b"\n")

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), asyncio.InvalidStateError):
            # pyvoy resolving a future the application cancelled (a send or receive abandoned
            # by a timeout or a disconnect): harmless.
            self.invalid_state_errors += 1
            return
        loop.default_exception_handler(context)

    # ----------------------------------------------------------------------------------------------
    # Drain

    def _on_control(self) -> None:
        settings = self._settings
        assert settings is not None
        try:
            data = os.read(settings.control_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        asyncio.get_running_loop().remove_reader(settings.control_fd)
        self.drain("asked to stop" if data else "the launcher is gone")

    async def _watch_failure(self, service: Service) -> None:
        reason = await service.failed()
        logger.error("%s; shutting down", reason)
        self._report({"event": "failed", "message": reason})
        self.drain(reason)

    def drain(self, reason: str) -> None:
        """Start the graceful stop (idempotent)."""
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(reason), name="serve-drain")

    async def _drain(self, reason: str) -> None:
        settings = self._settings
        hosted = self._hosted
        assert settings is not None
        assert hosted is not None
        started = time.monotonic()
        logger.info("%s draining (%s; at most %gs)", self._name, reason, settings.drain_timeout)
        hosted.service.drain()
        # Envoy's graceful drain: from now on every answer on an HTTP/1.1 connection says
        # "connection: close" and every HTTP/2 connection gets GOAWAY, so clients take their next
        # calls elsewhere; the listener stops accepting after --drain-time-s (the drain timeout).
        problem = ""
        try:
            status, _ = await asyncio.to_thread(
                admin_request, settings.admin_socket, "/drain_listeners?graceful", method="POST"
            )
            if status != 200:
                problem = f"its admin interface answered {status}"
        except OSError as exc:
            problem = str(exc)
        if problem:
            logger.warning("cannot drain Envoy's listeners: %s", problem)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.drain_timeout):
                while self._in_flight:
                    self._idle.clear()
                    await self._idle.wait()
        if self._in_flight:
            logger.warning(
                "%d calls still in flight after %gs; stopping anyway", self._in_flight, settings.drain_timeout
            )
        else:
            left = settings.drain_timeout - (time.monotonic() - started)
            await self._envoy_done(settings.admin_socket, max(left, ENVOY_FLUSH_SECONDS))
        logger.debug("drained in %.3fs", time.monotonic() - started)
        os.kill(os.getpid(), signal.SIGTERM)

    @staticmethod
    async def _envoy_done(admin_socket: Path, within: float) -> None:
        """Wait (at most ``within`` seconds) until Envoy has finished every request, then up to
        ``ENVOY_LINGER_SECONDS`` more while clients still hold connections.

        A call is done for the application once its last message is handed to pyvoy, but Envoy
        writes it a moment later, on its own thread; and a socket closed while the client's
        last frames (window updates) are unread is reset, which makes the client's kernel drop
        what it had not read yet. Stopping Envoy at once could therefore cut answers just given
        (streams ended with unavailable). The Watches that a drain was seen to cut had another
        cause, a cancellation mid-send in the hub's relays (``hub._passthrough.EndableStream``);
        this wait covers the hand-off to Envoy, which no test has caught failing on its own.
        """
        linger_until: float | None = None
        with contextlib.suppress(TimeoutError, OSError, ValueError):
            async with asyncio.timeout(within):
                while True:
                    status, body = await asyncio.to_thread(
                        admin_request, admin_socket, "/stats?filter=downstream_(rq|cx)_active$"
                    )
                    if status != 200:
                        return
                    active = {"rq": 0, "cx": 0}
                    for line in body.decode().splitlines():
                        name, _, value = line.partition(":")
                        # The admin interface's own counters include this very request.
                        if not name.startswith(("http.admin.", "listener.admin.")):
                            kind = "rq" if name.endswith("downstream_rq_active") else "cx"
                            active[kind] += int(value)
                    if not active["rq"]:
                        now = time.monotonic()
                        linger_until = linger_until or now + ENVOY_LINGER_SECONDS
                        if not active["cx"] or now >= linger_until:
                            return
                    await asyncio.sleep(0.02)

    # ----------------------------------------------------------------------------------------------
    # Requests

    def _set_ports(self, api: int, management: int | None) -> None:
        hosted = self._hosted
        assert hosted is not None
        self._ports = {api: hosted.api}
        if management is not None and hosted.management is not None:
            self._ports[management] = hosted.management
        if self._ports_known is not None and not self._ports_known.done():
            self._ports_known.set_result(None)

    async def _learn_ports(self) -> None:
        settings = self._settings
        assert settings is not None
        while True:
            try:
                listeners = "/listeners?format=json"
                _, body = await asyncio.to_thread(admin_request, settings.admin_socket, listeners)
                api, management = listener_addresses(json.loads(body))
            except (OSError, ValueError, KeyError, IndexError):
                await asyncio.sleep(0.01)
                continue
            self._set_ports(api, management)
            return

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        self._in_flight += 1
        try:
            hosted = self._hosted
            if hosted is None or self._ports_known is None:
                return
            if not self._ports_known.done():
                await self._ports_known
            server = scope.get("server")
            app = self._ports.get(server[1]) if server else None
            if app is None:  # a port we did not open: never the management application
                app = hosted.api
            exchange = _Exchange(scope, receive, send, hosted, self)
            await exchange.run(app)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    def refused(self, reason: str, peer: str) -> None:
        """A request was refused by the wrapper: count it, and log a summary now and then."""
        hosted = self._hosted
        if hosted is not None:
            hosted.on_refused(reason)
        summary = self._refusals.add(reason, peer)
        if summary:
            logger.warning("refused requests in the last %.0fs: %s", SUMMARY_SECONDS, summary)


class _Disconnects:
    """One poller for every request waiting to learn that its client went away (see the module
    docstring): pyvoy reports a disconnect only when asked."""

    def __init__(self) -> None:
        self._waiting: dict[Receive, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, receive: Receive) -> None:
        """Return once pyvoy's ``receive`` reports ``http.disconnect``."""
        loop = asyncio.get_running_loop()
        gone = self._waiting[receive] = loop.create_future()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._poll(), name="serve-disconnects")
        try:
            await gone
        finally:
            self._waiting.pop(receive, None)

    async def _poll(self) -> None:
        while self._waiting:
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
            for receive, gone in list(self._waiting.items()):
                if gone.done():
                    continue
                try:
                    message = await receive()
                except Exception:  # a request pyvoy has forgotten: its client is gone
                    message = {"type": "http.disconnect"}
                if message["type"] == "http.disconnect" and not gone.done():
                    gone.set_result(None)


class _Summary:
    """Counts refusals and yields one summary line at most every :data:`SUMMARY_SECONDS`."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._peers: set[str] = set()
        self._since = time.monotonic() - SUMMARY_SECONDS

    def add(self, reason: str, peer: str) -> str | None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        if len(self._peers) < 1000:
            self._peers.add(peer)
        now = time.monotonic()
        if now - self._since < SUMMARY_SECONDS:
            return None
        text = ", ".join(f"{count} {reason}" for reason, count in sorted(self._counts.items()))
        text += f" from {len(self._peers)} peer addresses"
        self._counts.clear()
        self._peers.clear()
        self._since = now
        return text


# --------------------------------------------------------------------------------------------------
# One request


class _Exchange:
    """One request through the wrapper (see the module docstring)."""

    __slots__ = (
        "_body_done",
        "_deadline",
        "_delivered",
        "_ended",
        "_gone",
        "_host",
        "_hosted",
        "_last_sent",
        "_lock",
        "_receive",
        "_scope",
        "_send",
        "_started",
    )

    def __init__(
        self, scope: dict[str, Any], receive: Receive, send: Send, hosted: Hosted, host: _Host
    ) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._hosted = hosted
        self._host = host
        self._started = False
        self._ended = False
        self._body_done = scope.get("method") in ("GET", "HEAD")
        #: The end of the body was delivered to the application: only a disconnect is left.
        self._delivered = False
        self._gone = False
        self._deadline: asyncio.Timeout | None = None
        self._last_sent = time.monotonic()
        self._lock: asyncio.Lock | None = None

    async def run(self, app: ASGIApp) -> None:
        scope = self._scope
        path = scope.get("path", "")
        hosted = self._hosted
        heartbeat: asyncio.Task[None] | None = None
        interval = hosted.stream_send_timeout / 3 if hosted.stream_send_timeout else None
        if path in hosted.streaming and interval:
            self._lock = asyncio.Lock()
            heartbeat = asyncio.create_task(self._heartbeat(interval), name="serve-heartbeat")
        app = with_content_length(app)
        try:
            if path in hosted.request_streaming or self._body_done:
                await app(scope, self._receive_message, self._send_message)
            else:
                await self._within_deadline(app, hosted.limits.request_timeout)
        except ClientGone:
            pass
        except Exception:
            logger.exception("unhandled error answering %s %s", scope.get("method"), path[:200])
            if not self._started:
                with contextlib.suppress(ClientGone):
                    for message in _plain(500, b"internal error\n"):
                        await self._deliver(message)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()

    async def _within_deadline(self, app: ASGIApp, limit: float) -> None:
        """Run ``app``; refuse the request if its body has not fully arrived within ``limit``."""
        try:
            async with asyncio.timeout(limit) as deadline:
                self._deadline = deadline
                await app(self._scope, self._receive_message, self._send_message)
        except TimeoutError:
            if not deadline.expired():
                raise  # the application's own
            await self._refuse(limit)

    async def _receive_message(self) -> dict[str, Any]:
        if self._delivered and not self._gone:  # wait for the client to go (pyvoy answers at once)
            await self._host.disconnects.wait(self._receive)
            self._gone = True
        if self._gone:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self._body_done = True
            self._delivered = True
            if self._deadline is not None:
                self._deadline.reschedule(None)
        elif message["type"] == "http.disconnect":
            self._delivered = self._gone = True
        return message

    async def _send_message(self, message: dict[str, Any]) -> None:
        if self._deadline is not None and self._deadline.expired():
            return  # refused: what the cancelled application still sends is dropped
        if self._lock is None:
            await self._deliver(message)
            return
        async with self._lock:
            await self._deliver(message)

    async def _deliver(self, message: dict[str, Any]) -> None:
        try:
            await self._send(message)
        except Exception as exc:
            if type(exc).__name__ != "ClientDisconnectedError":
                raise
            # pyvoy's one shared instance: keep nothing alive through it (see the module docstring).
            exc.__traceback__ = None
            exc.__context__ = None
            exc.__cause__ = None
            raise ClientGone() from None
        self._last_sent = time.monotonic()
        kind = message["type"]
        if kind == "http.response.start":
            self._started = True
        elif (kind == "http.response.body" and not message.get("more_body", False)) or (
            kind == "http.response.trailers" and not message.get("more_trailers", False)
        ):
            self._ended = True

    async def _heartbeat(self, interval: float) -> None:
        """While the answer streams, an empty body chunk after ``interval`` seconds of quiet."""
        lock = self._lock
        assert lock is not None
        with contextlib.suppress(ClientGone):
            while not self._ended:
                await asyncio.sleep(max(0.05, self._last_sent + interval - time.monotonic()))
                if not self._started or self._ended or time.monotonic() - self._last_sent < interval:
                    continue
                async with lock:
                    if not self._ended:
                        await self._deliver({"type": "http.response.body", "body": b"", "more_body": True})

    async def _refuse(self, limit: float) -> None:
        """The body did not arrive in time: count it and answer resource_exhausted (if still possible)."""
        scope = self._scope
        client = scope.get("client")
        self._host.refused(REQUEST_TIMEOUT, str(client[0]) if client else "?")
        if self._started:
            return
        message = (
            f"the request's body did not arrive within {limit:g}s "
            "(limits.request_timeout_seconds in otterscale.yaml)"
        )
        # A small answer; a client that reads nothing at all cannot hold this request for long.
        with contextlib.suppress(ClientGone, TimeoutError):
            async with asyncio.timeout(5.0):
                for response in refusal(scope, "resource_exhausted", message):
                    await self._deliver(response)


def _plain(status: int, body: bytes) -> list[dict[str, Any]]:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


#: Connect's HTTP status for each code it maps (the rest are 500).
_CONNECT_STATUS = {
    "resource_exhausted": 429,
    "unavailable": 503,
    "unauthenticated": 401,
    "deadline_exceeded": 504,
}
#: gRPC's number for each code.
_GRPC_CODE = {"resource_exhausted": 8, "unavailable": 14, "unauthenticated": 16, "deadline_exceeded": 4}


def refusal(scope: Mapping[str, Any], code: str, message: str) -> list[dict[str, Any]]:
    """ASGI messages that answer the request of ``scope`` with Connect ``code`` and ``message``
    in the caller's own protocol (Connect unary or streaming, gRPC, gRPC-Web; JSON or binary)."""
    content_type = ""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-type":
            content_type = bytes(value).decode("latin-1").strip().lower()
            break
    if content_type.startswith("application/grpc"):
        from urllib.parse import quote

        headers = [
            (b"content-type", content_type.encode()),
            (b"grpc-status", str(_GRPC_CODE.get(code, 2)).encode()),
            (b"grpc-message", quote(message, safe=" ").encode()),
        ]
        return [
            {"type": "http.response.start", "status": 200, "headers": headers, "trailers": False},
            {"type": "http.response.body", "body": b"", "more_body": False},
        ]
    error = json.dumps({"code": code, "message": message}).encode()
    if content_type.startswith("application/connect+"):
        end = json.dumps({"error": {"code": code, "message": message}}).encode()
        body = b"\x02" + len(end).to_bytes(4, "big") + end
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        return [
            {"type": "http.response.start", "status": 200, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False},
        ]
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(error)).encode())]
    return [
        {"type": "http.response.start", "status": _CONNECT_STATUS.get(code, 500), "headers": headers},
        {"type": "http.response.body", "body": error, "more_body": False},
    ]
