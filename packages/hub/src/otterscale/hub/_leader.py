"""Who leads and where: the Lease holder, its Pod's address, and the leader label on the Pods.

:class:`LeaderTracker` keeps, in memory, which replica holds the Lease and the IP of that
replica's Pod, so a follower forwards a call without any API request of its own: one watch on
the Lease (by name) and one on the holder's Pod (by name, restarted when the holder changes).
The Lease watch also feeds the elector (:meth:`LeaderElector.observe`) and wakes it when the
Lease is released or expires, which is what makes a take-over prompt.

A Lease counts as held while its holder is set and it was renewed, as this replica saw it, less
than ``leaseDurationSeconds`` ago (the local clock only: replicas' clocks may differ). A
renew is seen as a change of the Lease's resourceVersion.

:class:`PodLabeler` moves the leader label (``otterscale.io/leader=true``): the leader sets it
on its own Pod and removes it from any other Pod that still carries it (a leader that was
killed cannot clean up after itself); a replica removes it from its own Pod when it stops
leading and when it starts. The chart's tunnel Service selects that label, so agents always
reach the replica that runs the tunnel server.

:class:`KubernetesLeadership` puts elector, tracker and labeler together behind the
:class:`Leadership` protocol the hub uses (tests drive the hub through the same protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from kubernetes.aio import client
from kubernetes.aio.client import ApiClient, ApiException

from ._election import LeaderElector
from ._kube import CALL_TIMEOUT, follow_object, open_api_client, status_text
from ._lease import ElectionSettings
from ._tasks import cancel_and_wait, spawn

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """The replica that holds the Lease: its identity and, once its Pod is known, ``host:port``."""

    identity: str
    address: str | None = None

    @property
    def url(self) -> str | None:
        """``http://<address>`` of the leader's API, or None while its address is unknown."""
        return f"http://{self.address}" if self.address else None


class Leadership(Protocol):
    """What the hub needs from leader election (see :class:`KubernetesLeadership`)."""

    @property
    def identity(self) -> str:
        """This replica's identity."""
        ...

    @property
    def leading(self) -> bool:
        """Whether this replica holds the Lease right now."""
        ...

    def leader(self) -> LeaderInfo | None:
        """The current leader as seen from here (None: nobody holds the Lease)."""
        ...

    async def start(self, on_change: Callable[[], None]) -> None:
        """Start campaigning and tracking; ``on_change()`` follows any change of either."""
        ...

    async def step_down(self, reason: str) -> None:
        """Give up leadership at once and campaign again later."""
        ...

    async def mark_leader(self) -> None:
        """Label this replica's Pod as the leader (and no other); retries until done or cancelled."""
        ...

    async def unmark(self) -> None:
        """Remove the leader label from this replica's Pod (best effort, bounded)."""
        ...

    async def close(self) -> None:
        """Stop campaigning and tracking; release the Lease if held (bounded)."""
        ...

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The long-lived tasks (they must run until close)."""
        ...


def _format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class LeaderTracker:
    """The leader as seen by this replica, kept fresh by watches (see the module docstring)."""

    def __init__(
        self,
        api: ApiClient,
        *,
        namespace: str,
        lease_name: str,
        port: int,
        elector: LeaderElector | None = None,
        on_change: Callable[[], None] | None = None,
        stall_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stall_timeout = stall_timeout
        self._coordination = client.CoordinationV1Api(api)
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._lease_name = lease_name
        self._port = port
        self._elector = elector
        self._on_change = on_change
        self._clock = clock
        self._holder: str | None = None
        self._version: str | None = None
        self._renewed_at = 0.0
        self._duration = 0.0
        self._address: str | None = None
        self._pod_task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._expired = False

    def leader(self) -> LeaderInfo | None:
        """The holder of an unexpired Lease and its address (None: nobody leads right now)."""
        if self._holder is None or self._expired:
            return None
        return LeaderInfo(self._holder, self._address)

    async def run(self) -> None:
        """Watch the Lease (and the holder's Pod) until cancelled."""
        try:
            await follow_object(
                self._coordination.list_namespaced_lease_without_preload_content,
                self._namespace,
                self._lease_name,
                self._lease_changed,
                what=f"Lease {self._namespace}/{self._lease_name}",
                idle_timeout=self._stall_timeout,
            )
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            if self._pod_task is not None:
                await cancel_and_wait([self._pod_task])

    def _lease_changed(self, lease: dict[str, Any] | None) -> None:
        seen_wall, seen = time.time(), self._clock()
        spec = (lease or {}).get("spec") or {}
        holder = spec.get("holderIdentity") or None
        version = (lease or {}).get("metadata", {}).get("resourceVersion")
        if self._elector is not None:
            self._elector.observe(lease, seen_wall)
        renewed = version != self._version
        self._version = version
        if renewed:
            self._renewed_at = seen
            self._duration = float(spec.get("leaseDurationSeconds") or 0)
            self._schedule_expiry()
        changed = False
        if self._expired and renewed and holder is not None:
            self._expired = False
            changed = True
        if holder != self._holder:
            logger.info("leader: %s", holder or "(none)", extra={"leader": holder or ""})
            self._holder = holder
            self._address = None
            self._follow_pod(holder)
            changed = True
        if holder is None and self._elector is not None:
            self._elector.nudge()
        if changed:
            self._notify()

    def _schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._duration > 0:
            loop = asyncio.get_running_loop()
            delay = self._renewed_at + self._duration - self._clock()
            self._expiry = loop.call_later(max(0.0, delay) + 0.01, self._lease_expired)

    def _lease_expired(self) -> None:
        self._expiry = None
        if self._holder is not None and not self._expired:
            logger.warning(
                "the Lease of %s expired (not renewed for %gs)",
                self._holder,
                self._duration,
                extra={"leader": self._holder},
            )
            self._expired = True
            self._notify()
        if self._elector is not None:
            self._elector.nudge()

    def _follow_pod(self, holder: str | None) -> None:
        if self._pod_task is not None:
            self._pod_task.cancel()
            self._pod_task = None
        if holder is None:
            return

        def pod_changed(pod: dict[str, Any] | None) -> None:
            if holder != self._holder:
                return
            ip = ((pod or {}).get("status") or {}).get("podIP") or None
            address = _format_address(ip, self._port) if ip else None
            if address != self._address:
                self._address = address
                logger.info(
                    "leader %s is at %s", holder, address or "(no Pod IP yet)", extra={"leader": holder}
                )
                self._notify()

        self._pod_task = spawn(
            follow_object(
                self._core.list_namespaced_pod_without_preload_content,
                self._namespace,
                holder,
                pod_changed,
                what=f"Pod {self._namespace}/{holder}",
            ),
            name=f"hub-leader-pod:{holder}",
        )

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()


class PodLabeler:
    """Moves the leader label between the replicas' Pods (see the module docstring)."""

    def __init__(self, api: ApiClient, *, namespace: str, pod_name: str, label: str) -> None:
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._pod = pod_name
        self._label = label

    async def mark(self) -> None:
        """Label this Pod, then unlabel every other Pod that has the label; retry until done."""
        delay = 0.25
        while True:
            try:
                await self._patch(self._pod, "true")
                listed = await self._core.list_namespaced_pod(
                    self._namespace, label_selector=f"{self._label}=true", _request_timeout=CALL_TIMEOUT
                )
                for pod in listed.items:
                    name = pod.metadata.name if pod.metadata is not None else None
                    if name and name != self._pod:
                        logger.info("removing the leader label from Pod %s (a former leader)", name)
                        await self._patch(name, None)
            except ApiException as exc:
                if exc.status == 404:
                    logger.error(
                        "cannot label Pod %s/%s as the leader: it does not exist (POD_NAME must be this "
                        "replica's Pod name)",
                        self._namespace,
                        self._pod,
                    )
                    return
                logger.warning("cannot move the leader label (retrying in %gs): %s", delay, status_text(exc))
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("cannot move the leader label (retrying in %gs): %s", delay, status_text(exc))
            else:
                logger.info("labelled Pod %s/%s %s=true", self._namespace, self._pod, self._label)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def unmark(self, within: float = 2.0) -> None:
        """Remove the label from this Pod (one bounded attempt; the next leader cleans up too)."""
        try:
            async with asyncio.timeout(within):
                await self._patch(self._pod, None)
        except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("cannot remove the leader label from Pod %s: %s", self._pod, status_text(exc))

    async def _patch(self, name: str, value: str | None) -> None:
        try:
            await self._core.patch_namespaced_pod(
                name,
                self._namespace,
                {"metadata": {"labels": {self._label: value}}},
                _request_timeout=CALL_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 404 and name != self._pod:
                return  # gone meanwhile
            raise


class KubernetesLeadership:
    """:class:`Leadership` over a Kubernetes Lease (elector, tracker and labeler)."""

    def __init__(self, settings: ElectionSettings, *, port: int) -> None:
        self.settings = settings
        self._port = port
        self._api: ApiClient | None = None
        self._elector: LeaderElector | None = None
        self._tracker: LeaderTracker | None = None
        self._labeler: PodLabeler | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._on_change: Callable[[], None] | None = None

    @property
    def identity(self) -> str:
        """This replica's identity in the Lease."""
        return self.settings.identity

    @property
    def leading(self) -> bool:
        """Whether this replica holds the Lease."""
        return self._elector is not None and self._elector.leading

    def leader(self) -> LeaderInfo | None:
        """The current leader (None: nobody holds the Lease)."""
        return self._tracker.leader() if self._tracker is not None else None

    async def start(self, on_change: Callable[[], None]) -> None:
        """Load credentials; start the Lease watch and the campaign."""
        settings = self.settings
        self._on_change = on_change
        self._api, source = await open_api_client(settings.kubeconfig, settings.environ)
        logger.info(
            "leader election: Lease %s/%s as %s (lease %gs, renew deadline %gs, retry %gs), Kubernetes "
            "credentials from %s",
            settings.namespace,
            settings.lease_name,
            settings.identity,
            settings.lease_duration,
            settings.renew_deadline,
            settings.retry_period,
            source,
            extra={"identity": settings.identity},
        )
        self._elector = LeaderElector(settings, self._api, on_change=lambda _leading: on_change())
        self._tracker = LeaderTracker(
            self._api,
            namespace=settings.namespace,
            lease_name=settings.lease_name,
            port=self._port,
            elector=self._elector,
            on_change=on_change,
            # A Lease watch that stays quiet longer than a lease while a holder renews every retry
            # period is stalled: list again rather than wrongly decide that the lease expired.
            stall_timeout=max(settings.lease_duration, 5.0),
        )
        if settings.pod_name is not None:
            self._labeler = PodLabeler(
                self._api,
                namespace=settings.namespace,
                pod_name=settings.pod_name,
                label=settings.leader_label,
            )
            await self._labeler.unmark()  # left over from a previous run of this Pod
        else:
            logger.warning(
                "POD_NAME is not set: this replica labels no Pod, and followers cannot find its address "
                "when it leads"
            )
        self._tasks = [
            spawn(self._tracker.run(), name="hub-leader-tracker"),
            spawn(self._elector.run(), name="hub-election"),
        ]

    async def step_down(self, reason: str) -> None:
        """Release the Lease now and campaign again after one lease duration."""
        if self._elector is not None:
            await self._elector.step_down(reason)

    async def mark_leader(self) -> None:
        """Label this replica's Pod (no-op without POD_NAME)."""
        if self._labeler is not None:
            await self._labeler.mark()

    async def unmark(self) -> None:
        """Unlabel this replica's Pod (no-op without POD_NAME)."""
        if self._labeler is not None:
            await self._labeler.unmark()

    async def close(self) -> None:
        """Stop the campaign (releasing the Lease if held), then the watches; close the client."""
        tracker_tasks = self._tasks[:1]
        election_task = self._tasks[1] if len(self._tasks) > 1 else None
        if self._elector is not None:
            await self._elector.close(election_task)
        await cancel_and_wait(tracker_tasks)
        if self._api is not None:
            with contextlib.suppress(Exception):
                await self._api.close()
            self._api = None

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The tracker and election tasks."""
        return list(self._tasks)
