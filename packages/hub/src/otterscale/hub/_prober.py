"""The prober: how the hub learns, between calls, whether each agent answers through its tunnel.

While this replica serves the tunnels (leads, or runs alone) the prober pings every connected
agent (``GET /ping`` through its tunnel) every ``probe_interval`` seconds, and the others (chisel
reports them disconnected) every fourth round, and asks an agent for its versions
(``AgentService.GetAgentInfo``) once per tunnel session. A tunnel that opens, or a call that finds
its agent unreachable, probes that cluster at once (:meth:`Prober.probe_soon`). Results go to
:class:`~._tunnels.Tunnels`, which ClusterService, health and the proxy read.

A probe that timed out only because the hub itself was too busy to notice the answer (its event
loop ran the timeout late: a flood of requests being refused or cancelled) proves nothing about
the agent and is not counted: a healthy cluster must not be marked down because the hub was busy.

Every probe is a named task owned here; :meth:`Prober.stop` ends them all.
"""

from __future__ import annotations

import asyncio
import logging

from ._tasks import cancel_and_wait, spawn
from ._tunnels import Tunnels
from ._upstream import AgentClients

logger = logging.getLogger(__name__)

#: A timed-out probe whose timeout fired this fraction of the timeout late (or later) is not counted.
BUSY_SLACK = 0.25


class Prober:
    """Pings the agents and asks for their versions (see the module docstring)."""

    def __init__(self, tunnels: Tunnels, agents: AgentClients, *, interval: float, timeout: float) -> None:
        self._tunnels = tunnels
        self._agents = agents
        self._interval = interval
        self._timeout = timeout
        self._loop: asyncio.Task[None] | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._info_session: dict[str, int | None] = {}
        self._closed = False

    def start(self) -> None:
        """Start the periodic probes (this replica serves the tunnels now)."""
        if self._loop is None or self._loop.done():
            self._loop = spawn(self._probe_loop(), name="hub-prober")

    async def stop(self) -> None:
        """Stop the periodic probes and every probe in flight."""
        tasks = [task for task in (self._loop, *self._probes.values()) if task is not None]
        self._loop = None
        self._probes.clear()
        await cancel_and_wait(tasks)

    def close(self) -> None:
        """The hub is stopping: start no more probes."""
        self._closed = True

    def probe_soon(self, cluster: str) -> None:
        """Probe ``cluster``'s agent now (and ask for its versions), unless a probe is running."""
        running = self._probes.get(cluster)
        if self._closed or (running is not None and not running.done()):
            return
        self._probes[cluster] = spawn(self._probe(cluster, with_info=True), name=f"hub-probe:{cluster}")

    async def _probe_loop(self) -> None:
        """Ping connected agents every interval; the others (chisel reports them) every 4th."""
        tunnels = self._tunnels
        rounds = 0
        while True:
            await asyncio.sleep(self._interval)
            rounds += 1
            if not tunnels.server_up:
                continue
            names = [status.name for status in tunnels.snapshot() if status.tunnel_up or rounds % 4 == 0]
            await asyncio.gather(*(self._probe(name) for name in names))

    async def _probe(self, cluster: str, *, with_info: bool = False) -> None:
        tunnels = self._tunnels
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            round_trip = await self._agents.ping(cluster, within=self._timeout)
        except ConnectionError as exc:
            late = loop.time() - started - self._timeout
            if late > BUSY_SLACK * self._timeout:
                logger.info(
                    "cluster %s: probe inconclusive: the hub was busy (its timeout ran %.1fs late)",
                    cluster,
                    late,
                )
                return
            tunnels.probe_failed(cluster, str(exc))
            return
        tunnels.probe_ok(cluster, round_trip)
        status = tunnels.get(cluster)
        session = status.session if status is not None else None
        if with_info or cluster not in self._info_session or self._info_session[cluster] != session:
            self._info_session[cluster] = session
            await self._agent_info(cluster)

    async def _agent_info(self, cluster: str) -> None:
        tunnels = self._tunnels
        try:
            info = await self._agents.agent_info(cluster, within=self._timeout)
        except Exception as exc:  # any failure: versions stay unknown, the next probe asks again
            logger.info("cluster %s: the agent did not report its versions: %s", cluster, exc)
            self._info_session.pop(cluster, None)
            return
        if info is None:
            logger.debug("cluster %s: the agent does not implement AgentService", cluster)
            tunnels.agent_info(cluster, agent_version="", kubernetes_version="")
            return
        agent_version, kubernetes_version = info
        tunnels.agent_info(cluster, agent_version=agent_version, kubernetes_version=kubernetes_version)
