"""The fault injector: every few seconds it kills one component and brings it back.

Kinds (chosen at random, each with a weight):

- ``hub_kill``: SIGKILL a random hub replica (leader or follower), restart it after a short outage;
- ``hub_term``: SIGTERM a random replica (a graceful hand-over when it leads), restart it after it
  exited;
- ``agent_kill``: SIGKILL a random agent (its process group, so its chisel client too), restart it;
- ``agent_chisel_kill``: SIGKILL one agent's chisel client; the agent must bring it back itself;
- ``hub_chisel_kill``: SIGKILL the leader's chisel server; the hub must cope by itself;
- ``apiserver_restart``: SIGKILL kube-apiserver and start it again on the same port (the Lease,
  the relay's endpoint polling and every agent's calls go down with it); at most one per
  ``APISERVER_MIN_GAP`` seconds, as it is by far the heaviest.

Restarts spawn from the event loop's thread (the main thread), never from a worker thread: the
children's parent-death signal fires when the spawning thread ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

from otterscale.testing import ControlPlane, HubReplicas, ManagedProcess

from ._procs import children
from ._traffic import ApiserverRestarts

logger = logging.getLogger(__name__)

#: Killing a hub or an agent outright is rarer than killing a chisel child (which its parent
#: must bring back) so that some incarnations live long enough for the leak checks to mean
#: something; over a 10-minute run every kind still comes up dozens of times.
WEIGHTS = {
    "hub_kill": 2,
    "hub_term": 1,
    "agent_kill": 2,
    "agent_chisel_kill": 3,
    "hub_chisel_kill": 3,
    "apiserver_restart": 1,
}
APISERVER_MIN_GAP = 30.0


@dataclass
class FaultInjector:
    replicas: HubReplicas
    control_planes: list[ControlPlane]
    interval: float
    seed: int
    #: The fault kinds to inject (keys of :data:`WEIGHTS`), with their weights.
    kinds: tuple[str, ...] = tuple(WEIGHTS)
    apiserver: ApiserverRestarts = field(default_factory=ApiserverRestarts)
    injected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    log: list[tuple[float, str, str]] = field(default_factory=list)
    _last_apiserver: float = 0.0
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.started = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        kinds = list(self.kinds)
        while not self._stopping.is_set():
            with_jitter = self.interval * self.rng.uniform(0.5, 1.5)
            try:
                await asyncio.wait_for(self._stopping.wait(), with_jitter)
                return
            except TimeoutError:
                pass
            kind = self.rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
            target = await getattr(self, kind)()
            if target is None:
                self.skipped[kind] += 1
                continue
            self.injected[kind] += 1
            self.log.append((round(time.monotonic() - self.started, 1), kind, target))
            logger.info("fault %s: %s", kind, target)

    async def _outage(self) -> None:
        await asyncio.sleep(self.rng.uniform(0.5, 3.0))

    async def hub_kill(self) -> str | None:
        index = self.rng.choice(sorted(self.replicas.hubs))
        process = self.replicas.hubs[index]
        if not process.alive():
            return None
        process.signal(signal.SIGKILL)
        await _reaped(process, 10)
        await self._outage()
        self.replicas.start_hub(index)
        return f"hub-{index}"

    async def hub_term(self) -> str | None:
        index = self.rng.choice(sorted(self.replicas.hubs))
        process = self.replicas.hubs[index]
        if not process.alive():
            return None
        process.signal(signal.SIGTERM)
        await _reaped(process, 20)
        self.replicas.start_hub(index)
        return f"hub-{index}"

    async def agent_kill(self) -> str | None:
        name = self.rng.choice(sorted(self.replicas.agents))
        process = self.replicas.agents[name]
        if not process.alive():
            return None
        process.signal(signal.SIGKILL)
        await _reaped(process, 10)
        await self._outage()
        self.replicas.start_agent(name)
        return f"agent-{name}"

    async def agent_chisel_kill(self) -> str | None:
        name = self.rng.choice(sorted(self.replicas.agents))
        process = self.replicas.agents[name]
        pids = children(process.pid, "chisel") if process.alive() else []
        if not pids:
            return None
        _kill(pids[0])
        return f"agent-{name}/chisel"

    async def hub_chisel_kill(self) -> str | None:
        for index, process in sorted(self.replicas.hubs.items()):
            pids = children(process.pid, "chisel") if process.alive() else []
            if pids:
                _kill(pids[0])
                return f"hub-{index}/chisel"
        return None  # no replica runs a tunnel server right now (no leader)

    async def apiserver_restart(self) -> str | None:
        if time.monotonic() - self._last_apiserver < APISERVER_MIN_GAP:
            return None
        cp = self.rng.choice(self.control_planes)
        self._last_apiserver = time.monotonic()
        self.apiserver.started()
        try:
            await restart_apiserver(cp, outage=self.rng.uniform(0.5, 2.0))
        finally:
            self.apiserver.ready()
        self._last_apiserver = time.monotonic()
        return f"{cp.name}/kube-apiserver"


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def _reaped(process: ManagedProcess, within: float) -> None:
    """Wait (without blocking the loop) until the process exited, then reap it."""
    deadline = time.monotonic() + within
    while process.alive() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a child process
        await asyncio.sleep(0.05)
    process.stop(timeout=1)  # SIGKILLs a process that is still there; always reaps


async def restart_apiserver(cp: ControlPlane, *, outage: float) -> None:
    """SIGKILL kube-apiserver, then start it again with the same arguments, waiting without
    blocking the event loop. ``ControlPlane.restart_apiserver`` blocks (a graceful stop and a
    synchronous readiness wait): the soak's relay and clients share this thread."""
    apiserver = next(p for p in cp.processes if p.name.endswith("kube-apiserver"))
    apiserver.signal(signal.SIGKILL)
    await _reaped(apiserver, 10)
    await asyncio.sleep(outage)
    index = cp.processes.index(apiserver)
    replacement = ManagedProcess(apiserver.name, apiserver.argv, apiserver.log_file)
    cp.processes[index] = replacement
    deadline = time.monotonic() + 120
    while not await asyncio.to_thread(_ready, cp):
        if not replacement.alive():
            raise RuntimeError(f"kube-apiserver exited on restart; log {replacement.log_file}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"kube-apiserver not ready 120s after a restart; log {replacement.log_file}")
        await asyncio.sleep(0.2)


def _ready(cp: ControlPlane) -> bool:
    try:
        with urllib.request.urlopen(cp.server + "/readyz", context=cp.ssl_context, timeout=3) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False
