"""The hub's role: standalone, leader or follower, and the changes between them.

Without leader election the hub always serves the tunnels and the API itself ("standalone"):
:meth:`Role.start` starts the tunnel server and the prober. With it (``--leader-elect``) the hub
starts as a follower and campaigns for the Lease; :meth:`Role.campaign` starts the role loop, a
named task that follows the leadership:

- on gaining it: start the tunnel server (a replica that cannot start it steps down, releasing
  the Lease so another takes over), serve the API itself, start the prober, then label its own
  Pod as the leader (the tunnel Service selects that label);
- on losing it: forward calls again, end the streams it served with unavailable, stop the
  prober, unlabel its Pod and stop the tunnel server (sessions closed, ports freed);
- while leading: step down when the tunnel server has been down for
  :data:`TUNNEL_DOWN_STEP_DOWN` seconds (chisel keeps dying).

:meth:`Role.stop` ends all of it in order: the loop, the label task and the prober; the label and
the tunnel server (together); only then the Lease, so that a successor starts its own tunnel
server once this one is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from otterscale.common import OtterscaleError

from ._metrics import HubMetrics
from ._prober import Prober
from ._tasks import cancel_and_wait, spawn
from ._tunnel_server import TunnelServer
from ._tunnels import Tunnels

if TYPE_CHECKING:
    # Types only: the Kubernetes client it uses is loaded only for --leader-elect (start-up time).
    from ._leader import Leadership

logger = logging.getLogger(__name__)

#: A leader whose tunnel server has been down this long (it keeps dying) steps down.
TUNNEL_DOWN_STEP_DOWN = 15.0


class Role:
    """Which part this replica plays, and the moves between parts (see the module docstring)."""

    def __init__(
        self,
        leadership: Leadership | None,
        *,
        tunnel_server: TunnelServer,
        tunnels: Tunnels,
        prober: Prober,
        metrics: HubMetrics,
        end_streams: Callable[[], None],
    ) -> None:
        self.leadership = leadership
        self._tunnel_server = tunnel_server
        self._tunnels = tunnels
        self._prober = prober
        self._metrics = metrics
        self._end_streams = end_streams
        self._elected = leadership is not None
        # Without leader election the hub always serves itself (it "leads" alone).
        self._leading = not self._elected
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._mark_task: asyncio.Task[None] | None = None
        self._tunnel_down_since: float | None = None
        self._campaigning = False
        self._closing = False

    @property
    def leading(self) -> bool:
        """Whether this replica serves the API and the tunnels itself."""
        return self._leading

    @property
    def name(self) -> str:
        """``standalone`` (no leader election), ``leader`` or ``follower``."""
        if not self._elected:
            return "standalone"
        return "leader" if self._leading else "follower"

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The role loop and the leadership's own tasks (each must run as long as the hub)."""
        if self._task is None:
            return []
        tasks: list[asyncio.Task[Any]] = [self._task]
        if self.leadership is not None:
            tasks.extend(self.leadership.tasks())
        return tasks

    async def start(self) -> None:
        """Without leader election: serve the tunnels now (before the API listens)."""
        if not self._elected:
            await self._tunnel_server.start()
            self._metrics.leader.set(1)

    def serving(self) -> None:
        """The API serves: a hub alone starts probing its agents."""
        if not self._elected:
            self._prober.start()

    async def campaign(self, on_change: Callable[[], None]) -> None:
        """With leader election: campaign for the Lease and follow it (``on_change`` also hears
        every change of the known leader)."""
        assert self.leadership is not None

        def changed() -> None:
            self._changed.set()
            on_change()

        logger.info("leader election on: serving as a follower until this replica leads")
        self._campaigning = True
        await self.leadership.start(changed)
        self._task = spawn(self._run(), name="hub-role")

    def closing(self) -> None:
        """The hub is stopping: take no new role."""
        self._closing = True

    async def stop(self) -> None:
        """Stop following the leadership and give up the tunnels and the Lease (in that order)."""
        self._closing = True
        await cancel_and_wait(task for task in (self._task, self._mark_task) if task is not None)
        await self._prober.stop()
        if self.leadership is not None and self._leading:
            # Unlabel first (agents stop being sent here), in parallel with stopping the tunnels.
            await asyncio.gather(self.leadership.unmark(), self._tunnel_server.stop())
        else:
            await self._tunnel_server.stop()
        if self.leadership is not None and self._campaigning:
            # Only now, with the tunnel server gone, may a successor start its own.
            await self.leadership.close()
        self._set_leading(False)

    # ----------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Follow the leadership: become the leader or a follower (see the module docstring)."""
        assert self.leadership is not None
        leadership = self.leadership
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._changed.wait()
            self._changed.clear()
            if self._closing:
                return
            if leadership.leading and not self._leading:
                await self._become_leader()
            elif not leadership.leading and self._leading:
                await self._become_follower()
            elif self._leading:
                await self._check_tunnel_server()

    async def _become_leader(self) -> None:
        assert self.leadership is not None
        started = time.perf_counter()
        try:
            await self._tunnel_server.start()
        except (OtterscaleError, OSError, RuntimeError) as exc:
            logger.error("cannot start the tunnel server as the leader: %s", exc)
            await self._tunnel_server.stop()
            await self.leadership.step_down(f"the tunnel server did not start ({exc})")
            return
        if not self.leadership.leading or self._closing:  # lost it meanwhile
            await self._tunnel_server.stop()
            return
        self._set_leading(True)
        self._tunnel_down_since = None
        self._prober.start()
        self._mark_task = spawn(self.leadership.mark_leader(), name="hub-leader-label")
        logger.info(
            "serving as the leader (tunnel server started in %.0f ms)",
            (time.perf_counter() - started) * 1000,
            extra={"identity": self.leadership.identity},
        )

    async def _become_follower(self) -> None:
        assert self.leadership is not None
        self._set_leading(False)
        self._end_streams()
        await cancel_and_wait([self._mark_task] if self._mark_task is not None else [])
        self._mark_task = None
        await self._prober.stop()
        await asyncio.gather(self.leadership.unmark(), self._tunnel_server.stop())
        logger.info("serving as a follower: calls are forwarded to the leader")

    async def _check_tunnel_server(self) -> None:
        """Step down when the leader's tunnel server stays down (chisel keeps dying)."""
        assert self.leadership is not None
        if self._tunnels.server_up:
            self._tunnel_down_since = None
            return
        now = time.monotonic()
        if self._tunnel_down_since is None:
            self._tunnel_down_since = now
        elif now - self._tunnel_down_since > TUNNEL_DOWN_STEP_DOWN:
            await self.leadership.step_down(
                f"the tunnel server has been down for more than {TUNNEL_DOWN_STEP_DOWN:g}s"
            )
            await self._become_follower()

    def _set_leading(self, leading: bool) -> None:
        if not self._elected or leading == self._leading:
            return
        self._leading = leading
        self._metrics.leader.set(1 if leading else 0)
        self._metrics.leader_transitions.inc()
