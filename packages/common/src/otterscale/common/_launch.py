"""The launcher: ``otterscale server`` and ``otterscale agent`` start Envoy with the service inside.

:func:`serve` is the one serving function of both services. It runs in the command's own process
(the launcher), imports nothing but the standard library (and PyYAML to read the few limits
Envoy itself enforces), and stays the parent of Envoy for the service's whole life:

1. it writes Envoy's configuration (:mod:`._envoy`) into a private directory (mode 0700) that
   also holds Envoy's admin socket (mode 0600) and the routes file;
2. it starts Envoy with the application (``module:attribute``) inside, handing the service's
   settings over as JSON in the ``OTTERSCALE_SERVE`` environment variable (flags and paths, never
   a secret: the application reads ``otterscale.yaml`` itself), plus two pipes: *control*
   (launcher to application) and *status* (application to launcher);
3. the application reports on the status pipe that it started (or why it could not: the
   launcher prints that message, exactly as the command did before it served anything, and exits
   1), then the launcher waits for Envoy to serve, reads the bound ports from the admin socket and
   logs ``<name> ready at http://HOST:PORT (started in N ms)``;
4. SIGTERM or SIGINT: ``drain`` on the control pipe (the application stops being ready, ends its
   streams, drains Envoy's listener, waits for calls in flight up to the drain timeout, then stops
   Envoy, whose shutdown stops the service's background work); a second signal stops Envoy at
   once (connections closed, background work still stopped); a third, or the deadline (drain
   timeout plus stop budget), kills it;
5. exit status: 0 after a requested stop, 1 when the service could not start or failed (the
   application reported why) or Envoy died, 2 for bad command-line input (before anything starts).

Envoy sets its own parent-death signal (SIGTERM), so a launcher killed with SIGKILL still takes
Envoy down cleanly; the application also drains when the control pipe reaches end of file.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._envoy import (
    LIMIT_BOUNDS,
    Address,
    EnvoyInstall,
    EnvoyUnavailableError,
    ListenerLimits,
    bootstrap,
    envoy_host,
    envoy_log_format,
    envoy_log_level,
    route_config,
    write_json,
)

logger = logging.getLogger(__name__)

#: The environment variable carrying the settings (JSON) into the application inside Envoy.
SETTINGS_ENV = "OTTERSCALE_SERVE"
#: What the launcher writes on the control pipe to start a graceful stop.
DRAIN = b"drain\n"
#: Extra seconds Envoy gets after drain and stop before it is killed.
KILL_MARGIN = 5.0
#: Exit status of Envoy when the application ended it after reporting a start-up failure.
STARTUP_FAILED = 3


@dataclass(frozen=True, slots=True)
class Launch:
    """What :func:`serve` starts.

    ``name`` is the service (``hub``, ``agent``: log lines, Envoy's statistics); ``command`` the
    prefix of error messages (``otterscale server``); ``app`` the ASGI application
    (``module:attribute``); ``settings`` whatever the application needs from the command line
    (JSON-serialisable, no secrets). ``drain_timeout`` bounds how long calls in flight may take
    after a stop starts and ``stop_timeout`` the service's own shutdown after that.
    """

    name: str
    command: str
    app: str
    api: Address
    management: Address | None = None
    limits: ListenerLimits = field(default_factory=ListenerLimits)
    settings: Mapping[str, Any] = field(default_factory=dict)
    drain_timeout: float = 10.0
    stop_timeout: float = 15.0
    log_level: str = "info"
    log_format: str = "text"
    #: The event loop the application runs on inside Envoy (pyvoy's ``loop``: ``uvloop`` or
    #: ``asyncio``).
    loop: str = "uvloop"


def serve(launch: Launch) -> int:
    """Run the service in Envoy until it stops (see the module docstring); the exit status."""
    started = time.monotonic()
    try:
        install = EnvoyInstall.find()
    except EnvoyUnavailableError as exc:
        sys.stderr.write(f"{launch.command}: {exc}\n")
        return 1
    for address in (launch.api, launch.management):
        problem = _unusable(address) if address is not None else None
        if problem is not None:
            sys.stderr.write(f"{launch.command}: {problem}\n")
            return 1
    workdir = Path(tempfile.mkdtemp(prefix=f"otterscale-{launch.name}-"))
    try:
        return _Run(launch, install, workdir, started).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _Run:
    """One Envoy process from spawn to exit, and the signals that stop it."""

    def __init__(self, launch: Launch, install: EnvoyInstall, workdir: Path, started: float) -> None:
        self.launch = launch
        self.install = install
        self.workdir = workdir
        self.started = started
        self.admin_socket = workdir / "admin.sock"
        self.routes_file = workdir / "routes.json"
        self.failure: str | None = None
        self.signals = 0
        self.stop_requested_at: float | None = None
        self.ready = False
        self.timings: dict[str, Any] = {}
        self._status_buffer = b""

    def run(self) -> int:
        launch = self.launch
        config_file = self.workdir / "envoy.json"
        write_json(
            config_file,
            bootstrap(
                name=launch.name,
                app=launch.app,
                install=self.install,
                api=launch.api,
                management=launch.management,
                limits=launch.limits,
                loop=launch.loop,
                admin_socket=self.admin_socket,
                routes_file=self.routes_file,
            ),
        )
        # Until the application writes its own (at start-up, before Envoy reads it): no timers.
        write_json(self.routes_file, route_config((), stream_idle_timeout=None))
        control_read, self.control = os.pipe()
        self.status, status_write = os.pipe()
        env = self.install.environ(os.environ)
        env[SETTINGS_ENV] = json.dumps(
            {
                "name": launch.name,
                "service": dict(launch.settings),
                "control_fd": control_read,
                "status_fd": status_write,
                "admin_socket": str(self.admin_socket),
                "routes_file": str(self.routes_file),
                "api": [launch.api.host, launch.api.port],
                "management": [launch.management.host, launch.management.port] if launch.management else None,
                "limits": launch.limits.as_dict(),
                "drain_timeout": launch.drain_timeout,
                "stop_timeout": launch.stop_timeout,
                "log_level": launch.log_level,
                "log_format": launch.log_format,
            }
        )
        argv = [
            str(self.install.envoy),
            "--config-path",
            str(config_file),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            envoy_log_level(launch.log_level),
            "--log-format",
            envoy_log_format(launch.log_format),
            # Draining (the application asks for it) ends within the drain timeout: HTTP/1.1
            # connections get "connection: close", HTTP/2 ones GOAWAY.
            "--drain-strategy",
            "immediate",
            "--drain-time-s",
            str(max(1, math.ceil(launch.drain_timeout))),
        ]
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.spawned_after = process_age() or (time.monotonic() - self.started)
            try:
                # Envoy gets a process group of its own: a signal to the launcher's group (a
                # terminal's Ctrl-C, ``kill -TERM -PGID``, a supervisor's group stop) reaches the
                # launcher alone, which drains first; Envoy would close everything at once. Envoy
                # still dies with the launcher (it sets its own parent-death signal).
                self.envoy = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(control_read, status_write),
                    process_group=0,
                )
            except OSError as exc:
                sys.stderr.write(f"{launch.command}: cannot start Envoy ({self.install.envoy}): {exc}\n")
                return 1
            finally:
                os.close(control_read)
                os.close(status_write)
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (self.control, self.status):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # ----------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            self.stop_requested_at = time.monotonic()
            logger.info("%s received: shutting down", name)
            self._control(DRAIN)
        elif self.signals == 2:
            logger.warning("%s received again: stopping at once", name)
            self._signal_envoy(signal.SIGTERM)
        else:
            self._signal_envoy(signal.SIGKILL)

    def _control(self, message: bytes) -> None:
        try:
            os.write(self.control, message)
        except OSError:  # the application is gone already: stop Envoy directly
            self._signal_envoy(signal.SIGTERM)

    def _signal_envoy(self, sig: int) -> None:
        envoy = getattr(self, "envoy", None)
        if envoy is not None and envoy.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                envoy.send_signal(sig)

    def _supervise(self) -> int:
        launch = self.launch
        announced = False
        killed = False
        while True:
            code = self.envoy.poll()
            if code is not None:
                break
            self._read_status(0.05)
            if self.ready and not announced:
                announced = self._announce()
            if self.stop_requested_at is not None and not killed:
                deadline = self.stop_requested_at + launch.drain_timeout + launch.stop_timeout + KILL_MARGIN
                if time.monotonic() > deadline:
                    logger.error(
                        "Envoy did not stop within %.0fs; killing it", deadline - self.stop_requested_at
                    )
                    self._signal_envoy(signal.SIGKILL)
                    killed = True
        self._read_status(0)
        if self.failure is not None:
            sys.stderr.write(f"{launch.command}: {self.failure}\n")
            return 1
        if code == STARTUP_FAILED:
            return 1
        if self.stop_requested_at is not None and code in (0, -signal.SIGTERM) and not killed:
            logger.info("%s stopped", launch.name)
            return 0
        if not announced:
            sys.stderr.write(f"{launch.command}: Envoy exited with status {code} before serving\n")
        else:
            logger.error("Envoy exited unexpectedly with status %s", code)
        return 1

    def _read_status(self, timeout: float) -> None:
        """Read what the application reported (JSON lines) for up to ``timeout`` seconds."""
        try:
            readable, _, _ = select.select([self.status], [], [], timeout)
        except InterruptedError:  # a signal arrived
            return
        if not readable:
            return
        try:
            data = os.read(self.status, 65536)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return
            raise
        if not data:  # the application closed it (Envoy exiting): nothing more to read
            time.sleep(timeout)
            return
        self._status_buffer += data
        *lines, self._status_buffer = self._status_buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            event = message.get("event")
            if event == "started":
                self.ready = True
                self.timings = dict(message.get("timings") or {})
            elif event == "failed":
                self.failure = str(message.get("message") or "the service failed")

    def _announce(self) -> bool:
        """Once Envoy serves: log the ready line with the bound addresses. False: not yet."""
        try:
            status, _ = admin_request(self.admin_socket, "/ready")
            if status != 200:
                return False
            _, body = admin_request(self.admin_socket, "/listeners?format=json")
        except OSError:
            return False
        api, management = listener_addresses(json.loads(body))
        launch = self.launch
        # From this process's start (what a user or a probe waits for), not from serve()'s call.
        elapsed = process_age() or (time.monotonic() - self.started)
        extra: dict[str, Any] = {
            "address": _url(launch.api.host, api),
            "started_ms": round(elapsed * 1000),
            "startup_ms": {"launcher": round(self.spawned_after * 1000), **self.timings},
        }
        if management is not None and launch.management is not None:
            extra["management_address"] = _url(launch.management.host, management)
        logger.info(
            "%s ready at %s (started in %.0f ms)", launch.name, extra["address"], elapsed * 1000, extra=extra
        )
        return True


def _unusable(address: Address) -> str | None:
    """Why Envoy could not listen on ``address`` (in use, not local...), or None.

    Checked before Envoy starts, so the failure is reported as one line and the service's
    start-up (chisel, the Lease) is not even begun; Envoy would find the same and exit.
    """
    if address.port == 0:
        return None
    host, _ = envoy_host(address.host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, address.port))
    except OSError as exc:
        return f"cannot listen on {address.host or '*'}:{address.port}: {exc.strerror or exc}"
    return None


def process_age() -> float | None:
    """Seconds since this process was started, from /proc (None where there is none)."""
    try:
        with open("/proc/self/stat", "rb") as stat, open("/proc/uptime", "rb") as uptime:
            started = int(stat.read().rsplit(b")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def listener_addresses(listeners: Mapping[str, Any]) -> tuple[int, int | None]:
    """The API port and the management port (None without one) from admin ``/listeners``."""
    status = listeners["listener_statuses"][0]
    api = int(status["local_address"]["socket_address"]["port_value"])
    extra = status.get("additional_local_addresses") or []
    management = int(extra[0]["socket_address"]["port_value"]) if extra else None
    return api, management


def _url(host: str, port: int) -> str:
    shown = host or "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_request(path: Path, target: str, *, method: str = "GET", timeout: float = 2.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request to Envoy's admin interface on its Unix socket (blocking: the
    application calls it through a thread). Envoy's admin answers HTTP/1.0 with 426."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request(method, target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------------
# The limits Envoy enforces, read from otterscale.yaml without validating the rest of it


def configured_limits(config: Path, *, hub: bool) -> ListenerLimits:
    """The ``limits`` of ``config`` that Envoy enforces; defaults for anything absent or invalid.

    Only these few values are read here (the launcher must start fast); the application validates
    the whole file when it starts, reports any problem (so an invalid value here never serves),
    and checks that what Envoy was started with is what the validated file says. The agent takes
    only the request deadline from the file: its one client is the hub, through chisel.
    """
    defaults = ListenerLimits()
    limits = configured_value(config, "limits")
    if not isinstance(limits, dict):
        return defaults

    def number(key: str, default: float, *, integer: bool = True) -> Any:
        value = limits.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return default
        if integer and not isinstance(value, int):
            return default
        low, high = LIMIT_BOUNDS[key]
        return value if low <= value <= high else default

    request_timeout = float(number("request_timeout_seconds", defaults.request_timeout, integer=False))
    if not hub:
        return ListenerLimits(request_timeout=request_timeout)
    return ListenerLimits(
        request_timeout=request_timeout,
        max_connections=number("max_connections", defaults.max_connections),
        max_streams_per_connection=number("max_streams_per_connection", defaults.max_streams_per_connection),
        peer_requests_per_second=number("peer_requests_per_second", defaults.peer_requests_per_second),
    )


def configured_value(config: Path, *keys: str) -> object:
    """The value at ``keys`` in ``config`` (YAML), or None when the file or the keys cannot be read.

    A quick read for the launcher only: the application validates the file as a whole.
    """
    try:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with config.open("rb") as handle:
            value: object = yaml.load(handle.read(1024 * 1024 + 1), Loader=loader)  # noqa: S506 - safe
    except Exception:  # unreadable or not YAML: the application reports it
        return None
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
