"""The agent's end of the tunnel: ``chisel client``, supervised, and what it means for ``/readyz``.

The agent dials out to the hub's chisel server and asks for the reverse remote
``R:127.0.0.1:<tunnel_port>:127.0.0.1:<api_port>``, so the hub reaches this agent at its own
``http://127.0.0.1:<tunnel_port>`` (no inbound port on the agent's side: NAT-friendly).
:class:`Tunnel` runs common's :class:`~otterscale.common.ChiselClient` as a root task of the
agent (see ``_agent.run_agent``):

- the hub's fingerprint is required (chisel silently skips the check when it is empty);
- the password reaches chisel in its ``AUTH`` environment variable (the child's whole
  environment), never in argv, which any local user can read in ``/proc/<pid>/cmdline``;
- ``--max-retry-interval`` is :data:`DEFAULT_MAX_RETRY_INTERVAL` (2 s; chisel's default is five
  minutes, and values under one second silently become five minutes), so the agent is back within
  seconds of a hub restart or fail-over; ``--keepalive`` :data:`DEFAULT_KEEPALIVE` (10 s) makes a
  dead link (no FIN, no RST) noticed within two keepalive periods;
- a chisel client that dies is restarted with backoff (common's Supervisor); if it has not run for
  :attr:`TunnelSettings.dead_after` seconds (its supervision ended, or it cannot be respawned)
  the root task ends, which stops the agent with status 1 so that Kubernetes restarts it;
- on stop the chisel client is terminated (SIGTERM to its process group, bounded wait, SIGKILL);
  the kernel kills it too if the agent itself dies (parent-death signal).

Logs (logger ``otterscale.agent._tunnel``): up and down at INFO with the reason and the outage
length; a failure to connect at WARNING once per distinct reason (repeats at DEBUG) and a
reminder every :attr:`TunnelSettings.reminder_interval` seconds while it lasts, instead of a
warning every retry. chisel's own output is logged at DEBUG by the supervisor.

Never logs the password (nor passes it anywhere but to chisel's environment).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from otterscale.common import LOOPBACK, ChiselBinary, ChiselClient, ChiselClientState, ProcessError

if TYPE_CHECKING:
    from ._agent import Agent

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KEEPALIVE",
    "DEFAULT_MAX_RETRY_INTERVAL",
    "Tunnel",
    "TunnelSettings",
    "default_server_url",
    "target_host",
]

#: Upper bound of chisel's reconnect backoff, seconds (chisel's own default is 5 minutes).
DEFAULT_MAX_RETRY_INTERVAL = 2.0
#: chisel's SSH keepalive, seconds: a peer that stops answering is dropped after about twice this.
DEFAULT_KEEPALIVE = 10.0
#: How long a disconnect waits for chisel's next line to say why, before it is logged without.
_REASON_GRACE = 0.5
#: How often the watchdog looks at the chisel client.
_TICK = 0.5

FINGERPRINT_HINT = (
    "start the hub and copy the fingerprint it logs at start-up (or run "
    "`otterscale server --config FILE --print-fingerprint` with the hub's configuration)"
)


@dataclasses.dataclass(frozen=True)
class TunnelSettings:
    """The tunnel an agent keeps open to the hub (``clusters.<name>.agent`` plus the flags)."""

    chisel: ChiselBinary
    #: The hub's chisel server, ``http(s)://HOST[:PORT]`` (``--tunnel-server-url``).
    server_url: str
    #: The hub's tunnel fingerprint (base64 SHA256, as the hub logs it); required.
    fingerprint: str
    user: str
    password: str = dataclasses.field(repr=False)
    #: The hub-side loopback port of this cluster's reverse tunnel.
    tunnel_port: int
    max_retry_interval: float = DEFAULT_MAX_RETRY_INTERVAL
    keepalive: float = DEFAULT_KEEPALIVE
    #: The chisel client not running for this long ends the agent (status 1).
    dead_after: float = 30.0
    #: While connecting keeps failing for the same reason, repeat the warning this often.
    reminder_interval: float = 60.0
    #: How long to wait for a stopping chisel client before SIGKILL.
    stop_timeout: float = 2.0

    def client(
        self,
        *,
        api_host: str,
        api_port: int,
        on_state: Callable[[ChiselClientState], None] | None = None,
    ) -> ChiselClient:
        """A (not yet started) chisel client for an agent listening on ``api_host:api_port``.

        Raises :class:`~otterscale.common.TunnelError` for invalid settings (fingerprint format,
        URL, user, ports): building one is also how the settings are checked at start-up.
        """
        return ChiselClient(
            self.chisel,
            server_url=self.server_url,
            fingerprint=self.fingerprint,
            user=self.user,
            password=self.password,
            tunnel_port=self.tunnel_port,
            api_port=api_port,
            api_host=api_host,
            max_retry_interval=self.max_retry_interval,
            keepalive_seconds=self.keepalive,
            on_state=on_state,
            stop_timeout=self.stop_timeout,
        )

    def check(self, api_port: int) -> None:
        """Raise :class:`~otterscale.common.TunnelError` now if the settings cannot work."""
        self.client(api_host=LOOPBACK, api_port=api_port or 1)


def default_server_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` of the configuration's ``tunnel.server``.

    That is where the hub's tunnel server *binds*; an unspecified address (``0.0.0.0``, ``::`` or
    empty: all interfaces) means "this machine", so it becomes ``127.0.0.1``. An agent elsewhere
    passes ``--tunnel-server-url``.
    """
    text = host.strip().strip("[]")
    if text in ("", "0.0.0.0", "::"):  # noqa: S104 - an address to avoid, not to bind
        text = LOOPBACK
    return f"http://{_url_host(text)}:{int(port)}"


def target_host(listen_host: str) -> str:
    """Where chisel on the agent's machine reaches the agent's API, given its listen host.

    All interfaces (``""``, ``0.0.0.0``, ``::``) and ``localhost`` give ``127.0.0.1``; a specific
    address is used as it is (an IPv6 one in brackets, as chisel's remote syntax wants).
    """
    text = listen_host.strip().strip("[]")
    if text in ("", "0.0.0.0", "::", "localhost"):  # noqa: S104 - not a bind address
        return LOOPBACK
    return _url_host(text)


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


class _QuietClientEvents(logging.Filter):
    """Drops ChiselClient's own per-line event records (connected, disconnected, every error).

    The agent logs those events itself, once per change and without a warning per retry (common's
    ChiselClient warns on every failed attempt: every 2 s for as long as the hub is down). Errors
    (a failed callback) still pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName == "_on_line" and record.levelno < logging.ERROR)


class Tunnel:
    """The chisel client of one agent; :meth:`run` is the agent's ``tunnel`` root task."""

    def __init__(self, settings: TunnelSettings) -> None:
        self.settings = settings
        self._client: ChiselClient | None = None
        self._state = ChiselClientState()
        self._started_at: float | None = None
        self._ever_connected = False
        self._down_since: float | None = None  #: monotonic; None while up (or before start)
        self._failures = 0
        self._last_reason: str | None = None
        self._last_warning = 0.0
        self._pending_disconnect: asyncio.TimerHandle | None = None
        self._stopping = False

    # ----------------------------------------------------------------------------------------------
    # State

    @property
    def state(self) -> ChiselClientState:
        """The tunnel's current state (connected, since, last error, failed attempts)."""
        return self._state

    @property
    def connected(self) -> bool:
        return self._state.connected

    @property
    def chisel_pid(self) -> int | None:
        """The pid of the running chisel client, or None."""
        return self._client.pid if self._client is not None else None

    def readiness(self) -> str | None:
        """None when the tunnel is up; otherwise a short reason (the body of a 503 ``/readyz``)."""
        state = self._state
        if state.connected:
            return None
        if self._client is None:
            return "tunnel not started"
        if state.last_error:
            return f"tunnel down: {state.last_error}"
        if self._ever_connected:
            return f"tunnel down: disconnected from {self.settings.server_url}, reconnecting"
        return f"tunnel connecting to {self.settings.server_url}"

    # ----------------------------------------------------------------------------------------------
    # The root task

    async def run(self, agent: Agent) -> None:
        """Keep the tunnel open until cancelled; return if it cannot be kept (the agent stops)."""
        settings = self.settings
        client = settings.client(
            api_host=target_host(agent.host), api_port=agent.port, on_state=self._on_state
        )
        quiet = _QuietClientEvents()
        common_logger = logging.getLogger(ChiselClient.__module__)
        common_logger.addFilter(quiet)
        self._client = client
        self._started_at = self._down_since = time.monotonic()
        logger.info(
            "tunnel: chisel %s (%s) dials %s for %s (retry at most every %gs, keepalive %gs)",
            settings.chisel.version_text,
            settings.chisel.path,
            settings.server_url,
            client.remote,
            settings.max_retry_interval,
            settings.keepalive,
        )
        try:
            try:
                await client.start()
            except ProcessError as exc:
                logger.error("tunnel: the chisel client cannot run: %s", exc)
                return
            await self._watch(client)
        finally:
            self._stopping = True  # the disconnect that follows is ours: not worth a log line
            self._cancel_pending()
            try:
                await client.stop()
            finally:
                common_logger.removeFilter(quiet)
                logger.info("tunnel: chisel client stopped")

    async def _watch(self, client: ChiselClient) -> None:
        """Watchdog: end when the client has not run for ``dead_after``; remind while down."""
        settings = self.settings
        not_running_since: float | None = None
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            if client.pid is None:
                not_running_since = not_running_since if not_running_since is not None else now
                if now - not_running_since >= settings.dead_after:
                    logger.error(
                        "tunnel: the chisel client has not been running for %gs (%s); stopping the "
                        "agent so that it is restarted",
                        settings.dead_after,
                        self._state.last_error or "no error reported",
                    )
                    return
            else:
                not_running_since = None
            if (
                not self._state.connected
                and self._last_reason is not None
                and self._down_since is not None
                and now - self._last_warning >= settings.reminder_interval
            ):
                self._last_warning = now
                logger.warning(
                    "tunnel to %s still down after %s (%d failed attempts): %s",
                    settings.server_url,
                    _duration(now - self._down_since),
                    self._failures,
                    self._last_reason,
                )

    # ----------------------------------------------------------------------------------------------
    # State changes (called by ChiselClient on the event loop, for each new state)

    def _on_state(self, state: ChiselClientState) -> None:
        previous, self._state = self._state, state
        if self._stopping:
            return
        now = time.monotonic()
        if state.connected and not previous.connected:
            self._cancel_pending()
            self._connected(now)
        elif previous.connected and not state.connected:
            self._down_since = now
            if state.last_error:
                self._disconnected(state.last_error)
            else:
                # chisel says why on its next line, if at all (a clean close says nothing).
                self._pending_disconnect = asyncio.get_running_loop().call_later(
                    _REASON_GRACE, self._disconnected, None
                )
        elif (
            not state.connected
            and state.last_error
            and (state.attempts != previous.attempts or state.last_error != previous.last_error)
        ):
            if self._pending_disconnect is not None:
                self._cancel_pending()
                self._disconnected(state.last_error)
            else:
                self._failed(state.last_error, now)

    def _connected(self, now: float) -> None:
        settings = self.settings
        if not self._ever_connected:
            started = self._started_at if self._started_at is not None else now
            logger.info(
                "tunnel up: connected to %s %s after start; the hub reaches this agent at its 127.0.0.1:%d",
                settings.server_url,
                _duration(now - started),
                settings.tunnel_port,
                extra={"tunnel": "up"},
            )
        else:
            down = now - self._down_since if self._down_since is not None else 0.0
            attempts = f", {self._failures} failed attempts" if self._failures else ""
            logger.info(
                "tunnel up: reconnected to %s after %s down%s",
                settings.server_url,
                _duration(down),
                attempts,
                extra={"tunnel": "up"},
            )
        self._ever_connected = True
        self._down_since = None
        self._failures = 0
        self._last_reason = None

    def _disconnected(self, reason: str | None) -> None:
        self._pending_disconnect = None
        text = reason or "connection closed"
        logger.info(
            "tunnel down: disconnected from %s (%s); reconnecting, at most %gs apart",
            self.settings.server_url,
            text,
            self.settings.max_retry_interval,
            extra={"tunnel": "down"},
        )
        self._last_reason = text
        self._last_warning = time.monotonic()

    def _failed(self, reason: str, now: float) -> None:
        self._failures += 1
        if self._down_since is None:
            self._down_since = now
        if reason != self._last_reason:
            self._last_reason = reason
            self._last_warning = now
            logger.warning(
                "tunnel to %s not connected: %s (retrying at most %gs apart)",
                self.settings.server_url,
                reason,
                self.settings.max_retry_interval,
                extra={"tunnel": "down"},
            )
        else:
            logger.debug(
                "tunnel to %s: attempt %d failed: %s", self.settings.server_url, self._failures, reason
            )

    def _cancel_pending(self) -> None:
        if self._pending_disconnect is not None:
            self._pending_disconnect.cancel()
            self._pending_disconnect = None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
