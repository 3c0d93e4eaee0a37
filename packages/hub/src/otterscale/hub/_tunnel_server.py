"""The tunnel side of the hub: the chisel server that the agents dial out to.

:class:`TunnelServer` runs the chisel server (a subprocess, through ``otterscale.common``'s
supervisor) while this replica leads, or always for a hub alone: a new process on each
:meth:`~TunnelServer.start`, every configured cluster's agent user allowed only its own reverse
port (the authfile is written before the process starts). What chisel reports (sessions opened
and closed, its own exits and restarts) goes to :class:`~._tunnels.Tunnels` and the metrics; once
the hub is stopping, the server's own exit is expected and not reported.

The fingerprint depends only on the key, so every replica knows it from start-up
(:func:`probe_fingerprint` starts chisel for a moment on a free loopback port to read it); agents
pin it in ``clusters.<name>.agent.fingerprint``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket

from otterscale.common import (
    ChiselBinary,
    ChiselServer,
    ChiselServerEvent,
    OtterscaleConfig,
    TunnelUser,
    check_chisel,
)

from ._metrics import HubMetrics
from ._tunnels import Tunnels

logger = logging.getLogger(__name__)


class TunnelServer:
    """The chisel server of one hub (see the module docstring)."""

    def __init__(
        self,
        config: OtterscaleConfig,
        binary: ChiselBinary,
        tunnels: Tunnels,
        metrics: HubMetrics,
        *,
        keepalive: float,
    ) -> None:
        self._config = config
        self._binary = binary
        self._tunnels = tunnels
        self._metrics = metrics
        self._keepalive = keepalive
        self._last_fingerprint: str | None = None
        self._quiet = False
        #: The running chisel server (None while stopped).
        self.chisel: ChiselServer | None = None

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the running server, else the last one seen."""
        if self.chisel is not None and self.chisel.fingerprint is not None:
            return self.chisel.fingerprint
        return self._last_fingerprint

    async def probe(self) -> str:
        """Read (and remember) the fingerprint without serving (see :func:`probe_fingerprint`)."""
        self._last_fingerprint = fingerprint = await probe_fingerprint(self._binary, self._config)
        return fingerprint

    def quiet(self) -> None:
        """The hub is stopping: the server's exit is expected from now on, not news."""
        self._quiet = True

    async def start(self) -> None:
        """Start chisel (a new process each time); raise with chisel's own words if it cannot."""
        server = self._config.tunnel.server
        self.chisel = chisel = self._new_chisel()
        await chisel.start()
        self._last_fingerprint = chisel.fingerprint
        logger.info(
            "tunnel server (chisel %s) listening on %s:%d, fingerprint %s",
            self._binary.version_text,
            server.host,
            server.port,
            chisel.fingerprint,
            extra={"fingerprint": chisel.fingerprint, "tunnel_address": f"{server.host}:{server.port}"},
        )

    async def stop(self) -> None:
        """Stop chisel (sessions closed, ports freed); nothing to do when it is not running."""
        chisel = self.chisel
        if chisel is not None:
            try:
                await chisel.stop()
            finally:
                if self.chisel is chisel:
                    self.chisel = None

    def _new_chisel(self) -> ChiselServer:
        config = self._config
        server = config.tunnel.server
        return ChiselServer(
            self._binary,
            host=server.host,
            port=server.port,
            users=[
                TunnelUser(
                    user=c.agent.auth.user,
                    password=c.agent.auth.password.get_secret_value(),
                    port=c.agent.tunnel_port,
                )
                for c in config.clusters.values()
            ],
            key_seed=server.key_seed.get_secret_value() if server.key_seed is not None else None,
            key_file=server.key_file,
            keepalive_seconds=self._keepalive,
            on_event=self._event,
            on_restart=self._restarted,
        )

    def _event(self, event: ChiselServerEvent) -> None:
        if not self._quiet:
            self._tunnels.handle_event(event)

    def _restarted(self, count: int) -> None:
        self._metrics.chisel_restarts.inc()
        logger.warning("tunnel server restarted (%d restarts so far)", count)


async def tunnel_fingerprint(config: OtterscaleConfig, *, chisel: str | None = None) -> str:
    """The tunnel fingerprint the hub will present with ``config``'s key, without running a hub.

    Starts chisel for a moment on a free loopback port with the configured key (seed or file) and
    a throw-away user, reads the fingerprint it prints, and stops it. Agents need this value in
    ``clusters.<name>.agent.fingerprint``.
    """
    binary = await asyncio.to_thread(check_chisel, chisel)
    return await probe_fingerprint(binary, config)


async def probe_fingerprint(binary: ChiselBinary, config: OtterscaleConfig) -> str:
    """Start chisel with ``config``'s key on a free loopback port, read its fingerprint, stop it."""
    server = config.tunnel.server
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chisel_server = ChiselServer(
        binary,
        host="127.0.0.1",
        port=port,
        users=[TunnelUser(user="fingerprint-probe", password=secrets.token_urlsafe(24), port=1)],
        key_seed=server.key_seed.get_secret_value() if server.key_seed is not None else None,
        key_file=server.key_file,
    )
    await chisel_server.start()
    try:
        if chisel_server.fingerprint is None:  # pragma: no cover - chisel always prints it first
            raise RuntimeError("chisel did not print its fingerprint")
        return chisel_server.fingerprint
    finally:
        await chisel_server.stop()
