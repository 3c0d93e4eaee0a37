"""The agent inside Envoy: :data:`app` is what pyvoy serves for ``otterscale agent``.

The command (:mod:`._cli`) starts Envoy with this module's ``app`` and hands over its arguments;
here they are checked exactly as before serving (:func:`~._cli.settings_from_args`: the
configuration, the cluster, the tunnel settings, the chisel binary), the :class:`~._agent.Agent`
is started (Kubernetes credentials and client) before Envoy accepts a connection, and the tunnel
to the hub is dialled once the agent's port answers (the hub probes it through the tunnel at
once). :func:`otterscale.common.host` drains and stops it: Watches end with unavailable, calls in
flight finish (through the tunnel, which stops last), the client closes.

This is the only module of the agent that reads the environment inside Envoy (``PATH``,
``KUBECONFIG`` and the in-cluster service variables, as the command did).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from otterscale.common import Hosted, ListenerLimits, OtterscaleError, ServeSettings, host, streaming_methods

from ._agent import SERVICES, Agent, AgentSettings
from ._cli import settings_from_args, tune_tls_reads
from ._kubeconfig import KubeConfigError
from ._tasks import start_task, stop_tasks
from ._tunnel import Tunnel

logger = logging.getLogger(__name__)

#: How long the tunnel waits for the agent's own port to answer before it dials anyway.
LISTEN_WAIT = 30.0


class HostedAgent:
    """The agent and its tunnel, started, drained and stopped by the host."""

    def __init__(self, settings: AgentSettings) -> None:
        self._tunnel = Tunnel(settings.tunnel) if settings.tunnel is not None else None
        readiness = self._tunnel.readiness if self._tunnel is not None else None
        self.agent = Agent(settings, readiness=readiness)
        self._tunnel_task: asyncio.Task[None] | None = None

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The agent's ASGI application (once started)."""
        if self.agent.app is None:
            raise RuntimeError("the agent was not started")
        await self.agent.app(scope, receive, send)

    async def start(self) -> None:
        """Credentials, the Kubernetes client and the service; then the tunnel, in the background."""
        # Before the first TLS connection to kube-apiserver (the loop is asyncio's: LOOP).
        tune_tls_reads()
        try:
            await self.agent.start()
        except KubeConfigError as exc:
            raise OtterscaleError(str(exc)) from None
        if self.agent.settings.tunnel is None:
            logger.warning("--no-tunnel: the hub cannot reach this agent (/readyz answers 200 regardless)")
        elif self._tunnel is not None:
            self._tunnel_task = start_task(self._dial(self._tunnel), name="tunnel")

    async def _dial(self, tunnel: Tunnel) -> None:
        await _listening(self.agent.port, LISTEN_WAIT)
        await tunnel.run(self.agent)

    def drain(self) -> None:
        """Not ready; Watches end with unavailable (calls in flight still finish, through the tunnel)."""
        self.agent.drain()

    async def stop(self) -> None:
        """The tunnel, then the agent (client, credentials refresh)."""
        if self._tunnel_task is not None:
            await stop_tasks([self._tunnel_task], grace=3.0)
        await self.agent.stop()
        logger.info("agent stopped")

    async def failed(self) -> str:
        """Return once the tunnel can no longer be kept (the agent then stops, as before)."""
        if self._tunnel_task is None:
            await asyncio.Event().wait()
        assert self._tunnel_task is not None
        await asyncio.wait([self._tunnel_task])
        return "agent stopping: tunnel ended unexpectedly"


async def _listening(port: int, limit: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port`` (Envoy, once it serves)."""
    deadline = asyncio.get_running_loop().time() + limit
    delay = 0.01
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                logger.warning("port %d does not answer after %gs; dialling the hub anyway", port, limit)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        writer.close()
        return


async def _agent(settings: ServeSettings) -> Hosted:
    agent_settings, _, _ = settings_from_args(settings.service["argv"], dict(os.environ))
    if agent_settings.port != settings.api[1]:
        raise OtterscaleError(
            f"the agent was started on port {settings.api[1]} but its configuration says "
            f"{agent_settings.port}: was otterscale.yaml changed during start-up?"
        )
    hosted = HostedAgent(agent_settings)
    streaming, request_streaming = streaming_methods(SERVICES)
    return Hosted(
        service=hosted,
        api=hosted.app,
        limits=ListenerLimits(request_timeout=agent_settings.request_timeout),
        streaming=streaming,
        request_streaming=request_streaming,
    )


#: The ASGI application pyvoy loads (``otterscale.agent._hosted:app``).
app = host(_agent)
