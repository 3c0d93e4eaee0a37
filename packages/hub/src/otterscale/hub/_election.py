"""Leader election over a Kubernetes Lease: kubernetes.aio's ``LeaderElection``, its traps fixed.

:class:`LeaderElector` runs the library's ``LeaderElection`` with a Lease lock for the identity
of this replica and reports every change of leadership to a callback. It never starts or stops
anything itself: the hub reacts (tunnel server, pod label, forwarding).

Workarounds for kubernetes 37.0.2 (architecture.md), each checked against a real API server by
the tests:

- ``LeaseLock.create`` passes ``pretty=True``, which the pydantic-validated API method rejects
  with a ``ValidationError`` (not an ``ApiException``), so ``run()`` raised whenever the Lease did
  not exist yet. :class:`_Lock` creates it without that argument (a 409 means another replica
  created it first: retried at the next attempt).
- The lock writes local wall-clock time labelled as UTC, cannot parse a time with a whole
  second (no fraction) and turns a float duration into ``int("15.0")``; and a ``MicroTime`` read
  back with a whole second is re-sent without its fraction, which the API server refuses.
  :meth:`_Lock.update_lease` writes real UTC times, always with microseconds, sets
  ``acquireTime`` and counts ``leaseTransitions`` when the holder changes.
- No call has a timeout, and a transport error (not an ``ApiException``) escapes ``run()``:
  every call of :class:`_Lock` is bounded and a transport error is a failed attempt, so a leader
  rides out a short API outage up to its renew deadline as client-go does.
- ``run()`` returns once leadership is lost: :meth:`LeaderElector.run` loops it (one
  ``LeaderElection`` object for the whole life of the replica, so what it observed survives).
- A candidate polls every ``retry_period`` and counts a Lease's expiry from its own, polled,
  observation, so a take-over came up to two periods late. :meth:`LeaderElector.observe` feeds
  it what the Lease watch (:mod:`._leader`) saw, when it saw it, and :meth:`LeaderElector.nudge`
  wakes a waiting candidate at once when the Lease is released or expires.
- There is no release: :meth:`LeaderElector.close` clears ``holderIdentity`` (with a lease of
  one second, as client-go's ``ReleaseOnCancel``), so a successor takes over at its next attempt
  instead of after the lease expires.
- A renew that hangs could outlive the lease while the old leader still serves: a watchdog steps
  down when the last successful renew is older than ``renew_deadline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes.aio import client
from kubernetes.aio.client import ApiClient, ApiException
from kubernetes.aio.leaderelection.electionconfig import Config
from kubernetes.aio.leaderelection.leaderelection import LeaderElection
from kubernetes.aio.leaderelection.leaderelectionrecord import LeaderElectionRecord
from kubernetes.aio.leaderelection.resourcelock.leaselock import LeaseLock

from ._kube import CALL_TIMEOUT, status_text
from ._lease import (
    DEFAULT_LEASE_DURATION,
    ElectionSettings,
)

logger = logging.getLogger(__name__)


def _micro_now() -> datetime:
    return _with_fraction(datetime.now(UTC))


def _with_fraction(moment: datetime) -> datetime:
    """The same moment with a non-zero microsecond: a MicroTime with a whole second is sent without
    its fraction by the client's serializer and refused by the API server."""
    return moment.replace(microsecond=1) if moment.microsecond == 0 else moment


def election_record(lease: dict[str, Any]) -> LeaderElectionRecord:
    """The record ``LeaseLock.election_record`` makes of a Lease, from its raw JSON.

    The same strings (times as naive UTC ``str(datetime)``), so that the library compares it
    equal to what its own ``get`` reads; built without the typed model, which refuses fields it
    does not know (a newer API server's).
    """
    spec = lease.get("spec") or {}

    def when(text: str | None) -> str | None:
        if not text:
            return None
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return str(moment.astimezone(UTC).replace(tzinfo=None))

    duration = spec.get("leaseDurationSeconds")
    return LeaderElectionRecord(
        spec.get("holderIdentity") or None,
        str(duration) if duration else None,
        when(spec.get("acquireTime")),
        when(spec.get("renewTime")),
    )


class _Lock(LeaseLock):  # type: ignore[misc]  # kubernetes ships no type information
    """The library's Lease lock with the fixes listed in the module docstring."""

    def __init__(self, name: str, namespace: str, identity: str, api: ApiClient) -> None:
        super().__init__(name, namespace, identity, api)
        #: time.monotonic() of the last write of this replica as the holder.
        self.last_renew: float | None = None

    async def get(self, name: str, namespace: str) -> tuple[bool, Any]:
        try:
            lease = await self.api_instance.read_namespaced_lease(
                name, namespace, _request_timeout=CALL_TIMEOUT
            )
        except ApiException as exc:
            return False, exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # A failed attempt (status 0 is not a 404, so the library retries instead of creating).
            return False, ApiException(status=0, reason=status_text(exc))
        self.lease_reference = lease
        return True, self.election_record(lease)

    async def create(self, name: str, namespace: str, election_record: LeaderElectionRecord) -> bool:
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name), spec=self.update_lease(election_record)
        )
        try:
            await self.api_instance.create_namespaced_lease(namespace, body, _request_timeout=CALL_TIMEOUT)
        except ApiException as exc:
            if exc.status == 409:
                logger.debug("Lease %s/%s was created by another replica first", namespace, name)
            else:
                logger.warning("cannot create Lease %s/%s: %s", namespace, name, status_text(exc))
            return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("cannot create Lease %s/%s: %s", namespace, name, status_text(exc))
            return False
        logger.info("created Lease %s/%s", namespace, name)
        self._written(election_record)
        return True

    async def update(self, name: str, namespace: str, updated_record: LeaderElectionRecord) -> bool:
        if self.lease_reference is None:
            return False
        self.lease_reference.spec = self.update_lease(updated_record, self.lease_reference.spec)
        try:
            await self.api_instance.replace_namespaced_lease(
                name=name, namespace=namespace, body=self.lease_reference, _request_timeout=CALL_TIMEOUT
            )
        except ApiException as exc:
            level = logging.DEBUG if exc.status == 409 else logging.WARNING
            logger.log(level, "cannot update Lease %s/%s: %s", namespace, name, status_text(exc))
            return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("cannot update Lease %s/%s: %s", namespace, name, status_text(exc))
            return False
        self._written(updated_record)
        return True

    def update_lease(
        self, leader_election_record: LeaderElectionRecord, current_spec: client.V1LeaseSpec | None = None
    ) -> client.V1LeaseSpec:
        record = leader_election_record
        spec = current_spec if current_spec is not None else client.V1LeaseSpec()
        previous = spec.holder_identity
        now = _micro_now()
        spec.holder_identity = record.holder_identity
        spec.lease_duration_seconds = math.ceil(float(record.lease_duration or DEFAULT_LEASE_DURATION))
        spec.renew_time = now
        if previous != record.holder_identity or spec.acquire_time is None:
            spec.acquire_time = now
            if current_spec is not None:
                spec.lease_transitions = (spec.lease_transitions or 0) + 1
        else:
            spec.acquire_time = _with_fraction(spec.acquire_time)
        return spec

    def _written(self, record: LeaderElectionRecord) -> None:
        if record.holder_identity == self.identity:
            self.last_renew = time.monotonic()


class _Election(LeaderElection):  # type: ignore[misc]
    """The library's election with a candidate that can be woken (see :meth:`LeaderElector.nudge`)."""

    def __init__(self, config: Config, wake: asyncio.Event) -> None:
        super().__init__(config)
        self._wake = wake

    async def acquire(self) -> bool:
        retry_period = self.election_config.retry_period
        while True:
            self._wake.clear()
            if await self.try_acquire_or_renew():
                return True
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # arrives as the inner wait completes, and this loop would then never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_period):
                    await self._wake.wait()


class LeaderElector:
    """Campaigns for the Lease for as long as :meth:`run` runs (see the module docstring).

    ``on_change(leading)`` is called on the event loop whenever this replica gains or loses
    leadership; :attr:`leading` is the current state.
    """

    def __init__(
        self, settings: ElectionSettings, api: ApiClient, *, on_change: Callable[[bool], None]
    ) -> None:
        self.settings = settings
        self._on_change = on_change
        self._lock = _Lock(settings.lease_name, settings.namespace, settings.identity, api)
        self._wake = asyncio.Event()
        self._election = _Election(
            Config(
                lock=self._lock,
                lease_duration=settings.lease_duration,
                renew_deadline=settings.renew_deadline,
                retry_period=settings.retry_period,
                onstarted_leading=self._started_leading,
                onstopped_leading=self._stopped_leading,
            ),
            self._wake,
        )
        self._term: asyncio.Task[None] | None = None
        self._resume_at = 0.0
        self._closed = False
        self.leading = False
        self.terms = 0

    @property
    def identity(self) -> str:
        """The holder identity of this replica."""
        return self.settings.identity

    # ----------------------------------------------------------------------------------------------
    # Called by the Lease watch (LeaderTracker)

    def observe(self, lease: dict[str, Any] | None, seen_at: float) -> None:
        """Tell the candidate what the Lease looked like at ``seen_at`` (time.time()).

        Keeps the library's own bookkeeping (``observed_record``/``observed_time_milliseconds``),
        only with the watch's exact moment instead of the next poll's.
        """
        if lease is None or self.leading:
            return
        try:
            record = election_record(lease)
        except (ValueError, TypeError, AttributeError) as exc:  # never break the watch over this
            logger.debug("cannot read the Lease's record: %s", exc)
            return
        observed = self._election.observed_record
        if observed is None or observed.__dict__ != record.__dict__:
            self._election.observed_record = record
            self._election.observed_time_milliseconds = int(seen_at * 1000)

    def nudge(self) -> None:
        """Let a waiting candidate try at once (the Lease was released or has expired)."""
        self._wake.set()

    # ----------------------------------------------------------------------------------------------
    # Lifecycle

    async def run(self) -> None:
        """Campaign, lead, campaign again... until cancelled (a root task of the hub)."""
        failures = 0
        while not self._closed:
            pause = self._resume_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            self._term = asyncio.create_task(self._election.run(), name="hub-election-term")
            try:
                await self._supervise(self._term)
            finally:
                if not self._term.done():
                    self._term.cancel()
                    with contextlib.suppress(BaseException):
                        await self._term
                self._set_leading(False)
            error = None if self._term.cancelled() else self._term.exception()
            if error is not None:
                failures += 1
                delay = min(self.settings.retry_period * failures, 30.0)
                logger.warning(
                    "leader election failed (retrying in %gs): %s", delay, status_text(error), exc_info=error
                )
                self._resume_at = max(self._resume_at, time.monotonic() + delay)
            else:
                failures = 0

    async def _supervise(self, term: asyncio.Task[None]) -> None:
        """Wait for ``term`` to end; end it when the last renew is older than the renew deadline."""
        tick = min(0.5, self.settings.retry_period / 2)
        while not term.done():
            await asyncio.wait({term}, timeout=tick)
            last = self._lock.last_renew
            if self.leading and last is not None and time.monotonic() - last > self.settings.renew_deadline:
                logger.error(
                    "the Lease was not renewed for %.1fs (renew deadline %gs): stepping down",
                    time.monotonic() - last,
                    self.settings.renew_deadline,
                )
                term.cancel()
                with contextlib.suppress(BaseException):
                    await term
                return

    async def step_down(self, reason: str, *, sit_out: float | None = None) -> None:
        """Give up leadership now (release the Lease) and campaign again after ``sit_out`` seconds.

        Used when this replica cannot serve as the leader (its tunnel server does not start), so
        that another replica takes over at once. ``sit_out`` defaults to the lease duration.
        """
        logger.warning("stepping down as leader: %s", reason)
        self._resume_at = time.monotonic() + (self.settings.lease_duration if sit_out is None else sit_out)
        term = self._term
        if term is not None and not term.done():
            term.cancel()
            with contextlib.suppress(BaseException):
                await term
        self._set_leading(False)
        await self.release()

    async def close(self, run_task: asyncio.Task[None] | None) -> None:
        """Stop campaigning (cancel ``run_task``) and release the Lease if this replica holds it."""
        self._closed = True
        held = self.leading or self._lock.last_renew is not None
        if run_task is not None and not run_task.done():
            run_task.cancel()
            with contextlib.suppress(BaseException):
                await run_task
        self._set_leading(False)
        if held:
            await self.release()

    async def release(self) -> bool:
        """Clear the Lease's holder if it is this replica (bounded); True when released."""
        api = self._lock.api_instance
        name, namespace = self.settings.lease_name, self.settings.namespace
        for _ in range(3):
            try:
                lease = await api.read_namespaced_lease(name, namespace, _request_timeout=2.0)
                if lease.spec is None or lease.spec.holder_identity != self.identity:
                    return False
                now = _micro_now()
                lease.spec.holder_identity = None
                lease.spec.lease_duration_seconds = 1
                lease.spec.acquire_time = now
                lease.spec.renew_time = now
                await api.replace_namespaced_lease(name, namespace, lease, _request_timeout=2.0)
            except ApiException as exc:
                if exc.status == 409:
                    continue
                logger.warning("cannot release Lease %s/%s: %s", namespace, name, status_text(exc))
                return False
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("cannot release Lease %s/%s: %s", namespace, name, status_text(exc))
                return False
            self._lock.last_renew = None
            logger.info("released Lease %s/%s", namespace, name)
            return True
        return False

    # ----------------------------------------------------------------------------------------------

    async def _started_leading(self) -> None:
        self.terms += 1
        self._set_leading(True)

    async def _stopped_leading(self) -> None:
        self._set_leading(False)

    def _set_leading(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            logger.info(
                "%s is now the leader (Lease %s/%s)",
                self.identity,
                self.settings.namespace,
                self.settings.lease_name,
                extra={"identity": self.identity},
            )
        else:
            logger.warning("%s is no longer the leader", self.identity, extra={"identity": self.identity})
        self._on_change(leading)
