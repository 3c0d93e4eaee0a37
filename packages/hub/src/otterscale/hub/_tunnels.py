"""Whether each cluster's agent is reachable: the state behind routing, ListClusters and health.

A cluster is *connected* when the tunnel server has its reverse port open (chisel reports it in
its log as soon as the agent's session opens, and the session's close just as fast) and the
agent behind the port did not fail its last health probe. The hub decides on every request from
this in-memory state alone, so a request for a disconnected cluster fails at once, without any
network probe.

Sources, in order of speed:

1. chisel server events (:meth:`Tunnels.handle_event`): tunnel open and closed, refused logins,
   refused or busy ports, the server's own exit;
2. the prober (``Hub``): every few seconds a ``GET /ping`` through each tunnel (the agent's
   liveness endpoint, one HTTP/2 stream on the warm connection). Its round trip is recorded; two
   failures in a row mark an open tunnel whose agent does not answer as disconnected, and a success
   on a port chisel did not report (a missed log line) marks it connected;
3. forwarded calls: a transport failure asks for an immediate probe, a success counts as contact.

Every change of ``connected`` is logged (with the cluster and reason), counted in the metrics and
announced to waiters (:meth:`Tunnels.wait_changed`, used by gRPC health Watch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from otterscale.common import ChiselServerEvent, ServerEventKind

from ._metrics import HubMetrics

logger = logging.getLogger(__name__)

#: Consecutive failed probes after which an open tunnel's agent counts as not answering.
PROBE_FAILURES_TO_DISCONNECT = 2


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """One cluster as the hub sees it (an immutable snapshot)."""

    name: str
    tunnel_port: int
    user: str
    tunnel_up: bool = False
    agent_answering: bool = True
    since: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None
    last_seen: float | None = None
    round_trip: float | None = None
    agent_version: str = ""
    kubernetes_version: str = ""
    agent_address: str = ""
    session: int | None = None
    probe_failures: int = 0

    @property
    def connected(self) -> bool:
        """Whether calls for this cluster are forwarded."""
        return self.tunnel_up and self.agent_answering


class Tunnels:
    """The connection state of every configured cluster (see the module docstring).

    ``on_tunnel_open(name)`` is called when a cluster's tunnel opens (the hub probes it and asks
    the agent for its versions); ``clock`` gives wall-clock seconds.
    """

    def __init__(
        self,
        clusters: Mapping[str, tuple[int, str]],
        metrics: HubMetrics,
        *,
        on_tunnel_open: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        started = clock()
        self._status = {
            name: ClusterStatus(name=name, tunnel_port=port, user=user, since=started)
            for name, (port, user) in clusters.items()
        }
        self._by_port = {status.tunnel_port: name for name, status in self._status.items()}
        self._by_user = {status.user: name for name, status in self._status.items()}
        self._metrics = metrics
        self._on_tunnel_open = on_tunnel_open
        self._changed = asyncio.Event()
        self.server_up = False

    # ----------------------------------------------------------------------------------------------
    # Reading

    def get(self, name: str) -> ClusterStatus | None:
        """The current status of cluster ``name``, or None if it is not configured."""
        return self._status.get(name)

    def names(self) -> list[str]:
        """Configured cluster names, sorted."""
        return sorted(self._status)

    def snapshot(self) -> list[ClusterStatus]:
        """Every cluster's status, sorted by name."""
        return [self._status[name] for name in sorted(self._status)]

    async def wait_changed(self) -> None:
        """Return at the next change of any cluster's connected state or of the tunnel server."""
        await self._changed.wait()

    # ----------------------------------------------------------------------------------------------
    # Tunnel server events

    def handle_event(self, event: ChiselServerEvent) -> None:
        """Apply one chisel server event."""
        kind = event.kind
        if kind is ServerEventKind.LISTENING:
            self._set_server(True)
        elif kind is ServerEventKind.EXITED:
            self._set_server(False)
            for name, status in self._status.items():
                if status.tunnel_up:
                    self._update(
                        name,
                        tunnel_up=False,
                        session=None,
                        agent_address="",
                        error=f"the tunnel server {event.detail}; the agent will reconnect",
                    )
        elif kind is ServerEventKind.TUNNEL_OPEN:
            for port in event.ports:
                tunnel_name = self._by_port.get(port)
                if tunnel_name is None:
                    logger.warning(
                        "tunnel server opened unexpected port %d (session %s)", port, event.session
                    )
                    continue
                self._update(
                    tunnel_name,
                    tunnel_up=True,
                    agent_answering=True,
                    probe_failures=0,
                    session=event.session,
                    agent_address=event.address or "",
                    seen=True,
                    reason=f"tunnel opened from {event.address or '?'} (session {event.session})",
                )
                if self._on_tunnel_open is not None:
                    self._on_tunnel_open(tunnel_name)
        elif kind is ServerEventKind.SESSION_CLOSED:
            for port in event.ports:
                tunnel_name = self._by_port.get(port)
                if tunnel_name is None or self._status[tunnel_name].session != event.session:
                    continue
                self._update(
                    tunnel_name,
                    tunnel_up=False,
                    session=None,
                    agent_address="",
                    error=f"the agent's tunnel closed (it was open for {event.detail})",
                )
        elif kind is ServerEventKind.LOGIN_FAILED:
            user_name = self._by_user.get(event.user or "")
            message = (
                f"tunnel login refused for user {event.user!r} from {event.address}: wrong password "
                "(clusters.<name>.agent.auth must match on hub and agent)"
            )
            if user_name is not None:
                self._update(user_name, error=message)
            else:
                logger.warning("%s; no cluster has that user", message)
        elif kind is ServerEventKind.SESSION_FAILED:
            for port in event.ports:
                port_name = self._by_port.get(port)
                if port_name is None:
                    continue
                detail = event.detail or ""
                if "denied" in detail and f"'R:127.0.0.1:{port}'" in detail:
                    # This cluster's own user may open exactly R:127.0.0.1:<port>: a refusal of
                    # that remote means another user asked for it.
                    message = (
                        f"a tunnel client was refused this cluster's port {port}: it logged in as "
                        "another cluster's agent user (check clusters.<name>.agent on that agent)"
                    )
                elif "denied" in detail:
                    message = (
                        f"a tunnel client was refused a remote on port {port} ({detail}); agents may "
                        f"only ask for R:127.0.0.1:{port} (check the agent's tunnel settings)"
                    )
                elif "cannot listen" in detail:
                    message = (
                        f"tunnel port {port} is busy on the hub: another agent of this cluster is "
                        "connected, or another process holds the port"
                    )
                else:
                    message = f"tunnel session failed: {detail}"
                self._update(port_name, error=message)
            if not event.ports:
                logger.warning("tunnel session %s failed: %s", event.session, event.detail)

    # ----------------------------------------------------------------------------------------------
    # Probes and calls

    def probe_ok(self, name: str, round_trip: float) -> None:
        """A health probe through the tunnel answered in ``round_trip`` seconds."""
        status = self._status[name]
        self._metrics.agent_roundtrip.labels(cluster=name, method="ping").observe(round_trip)
        if not status.tunnel_up:
            self._update(
                name,
                tunnel_up=True,
                agent_answering=True,
                probe_failures=0,
                round_trip=round_trip,
                seen=True,
                reason="the agent answers through its tunnel port",
            )
            return
        self._update(
            name,
            agent_answering=True,
            probe_failures=0,
            round_trip=round_trip,
            seen=True,
            reason="the agent answers again",
        )

    def probe_failed(self, name: str, reason: str) -> None:
        """A health probe through an open tunnel failed."""
        status = self._status[name]
        if not status.tunnel_up:
            return
        failures = status.probe_failures + 1
        if failures >= PROBE_FAILURES_TO_DISCONNECT:
            self._update(
                name,
                agent_answering=False,
                probe_failures=failures,
                error=f"the tunnel is open but the agent does not answer: {reason}",
            )
        else:
            self._update(name, probe_failures=failures)

    def seen(self, name: str) -> None:
        """A forwarded call reached the agent."""
        now = self._clock()
        status = self._status.get(name)
        if status is not None and (status.last_seen is None or now - status.last_seen >= 1.0):
            self._status[name] = replace(status, last_seen=now)
            self._metrics.tunnel_last_seen.labels(cluster=name).set(now)

    def call_failed(self, name: str, reason: str) -> None:
        """A forwarded call could not reach the agent (transport error)."""
        self._update(name, error=f"a forwarded call could not reach the agent: {reason}")

    def agent_info(self, name: str, *, agent_version: str, kubernetes_version: str) -> None:
        """Record what the agent reported about itself."""
        status = self._status.get(name)
        if status is not None:
            self._status[name] = replace(
                status, agent_version=agent_version, kubernetes_version=kubernetes_version
            )

    def record_error(self, name: str, message: str) -> None:
        """Remember a problem with cluster ``name`` for ListClusters."""
        self._update(name, error=message)

    # ----------------------------------------------------------------------------------------------

    def _set_server(self, up: bool) -> None:
        if self.server_up != up:
            self.server_up = up
            self._metrics.chisel_up.set(1 if up else 0)
            self._notify()

    def _update(
        self,
        name: str,
        *,
        error: str | None = None,
        reason: str | None = None,
        seen: bool = False,
        **changes: object,
    ) -> None:
        status = self._status[name]
        now = self._clock()
        updated = replace(status, **changes)  # type: ignore[arg-type]
        if error is not None:
            updated = replace(updated, last_error=error, last_error_at=now)
        if seen:
            updated = replace(updated, last_seen=now)
            self._metrics.tunnel_last_seen.labels(cluster=name).set(now)
        if updated.connected != status.connected:
            updated = replace(updated, since=now)
            self._metrics.tunnel_up.labels(cluster=name).set(1 if updated.connected else 0)
            self._metrics.tunnel_transitions.labels(cluster=name).inc()
            if updated.connected:
                logger.info(
                    "cluster %s: agent connected: %s",
                    name,
                    reason or "",
                    extra={"cluster": name, "tunnel_port": updated.tunnel_port},
                )
            else:
                logger.warning(
                    "cluster %s: agent disconnected: %s",
                    name,
                    error or reason or "",
                    extra={"cluster": name, "tunnel_port": updated.tunnel_port},
                )
            self._status[name] = updated
            self._notify()
            return
        if error is not None and error != status.last_error:
            logger.warning("cluster %s: %s", name, error, extra={"cluster": name})
        self._status[name] = updated

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
