"""Exec and port-forward sessions: ids, ownership, limits, and the lookup writes go through.

A session id is ``<cluster>.<22 characters>``: the cluster this agent serves (the hub routes a
WriteTTY, ResizeTTY or WritePortForward on the part before the first ``.``, so it needs no
session table) and 128 random bits, base64url without padding. The id is a capability only
together with the caller: a session is bound to the subject and the groups (a digest of them)
of the signed identity that started it and to its kind, and every lookup checks all of that.
Whatever fails (malformed, another cluster, unknown, ended, another caller, another kind) is the
same :class:`~.._errors.SessionNotFoundError`, found in comparable time (the table is keyed by a
SHA-256 of the id, the id and the owner are compared with ``hmac.compare_digest``). Ids never
appear in logs or errors: :func:`session_ref` (a short hash) names a session in logs.

Limits: open sessions per subject and per agent, per kind (``runtime.max_*`` in the
configuration). A session counts from :meth:`SessionRegistry.open` (before Kubernetes is asked,
so concurrent starts cannot overshoot) until :meth:`SessionRegistry.close`, which the stream
handler calls however the stream ends. Idle timeout and lifetime are enforced by the stream
handler (it wakes at least every heartbeat); :meth:`SessionRegistry.sweep` is only a safety net.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from otterscale.common import Identity, RuntimeConfig

from .._errors import (
    AgentError,
    SessionExpiredError,
    SessionLimitError,
    SessionNotFoundError,
    ShuttingDownError,
)
from .._metrics import AgentMetrics
from ._input import OrderedInput
from ._pump import END, TIMEOUT, Pump

logger = logging.getLogger(__name__)

__all__ = [
    "Owner",
    "Session",
    "SessionKind",
    "SessionRegistry",
    "new_session_id",
    "session_events",
    "session_ref",
]

#: Longest session id looked up at all (``<63-character cluster>.<22>`` is 86).
MAX_SESSION_ID = 128
#: How often the safety-net sweep looks for sessions whose stream handler missed their end.
SWEEP_INTERVAL = 30.0


class SessionKind(enum.Enum):
    EXEC = "exec"
    PORT_FORWARD = "port-forward"


_LIMIT_KEYS = {
    SessionKind.EXEC: ("max_exec_sessions_per_subject", "max_exec_sessions"),
    SessionKind.PORT_FORWARD: ("max_port_forward_sessions_per_subject", "max_port_forward_sessions"),
}


def new_session_id(cluster: str) -> str:
    """``<cluster>.<22 base64url characters of 16 random bytes>``."""
    token = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")
    return f"{cluster}.{token}"


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


def session_ref(session_id: str) -> str:
    """A short, non-reversible name of a session for logs (never log the id itself)."""
    return _digest(session_id).hex()[:12]


@dataclasses.dataclass(frozen=True, slots=True)
class Owner:
    """Who may use a session: the subject and a digest of the (sorted) groups."""

    subject: str
    groups_digest: bytes

    @classmethod
    def of(cls, identity: Identity) -> Owner:
        # Length-prefixed, so no two group lists share an encoding; sorted, so order is irrelevant.
        encoded = b"".join(
            len(raw).to_bytes(4, "big") + raw for raw in (g.encode("utf-8") for g in sorted(identity.groups))
        )
        return cls(identity.subject, hashlib.sha256(encoded).digest())

    def matches(self, other: Owner) -> bool:
        return hmac.compare_digest(self.subject.encode(), other.subject.encode()) & hmac.compare_digest(
            self.groups_digest, other.groups_digest
        )


@dataclasses.dataclass(eq=False)
class Session:
    """One exec or port-forward session (its Kubernetes stream lives in the stream handler)."""

    id: str
    kind: SessionKind
    owner: Owner
    namespace: str
    pod: str
    #: The owner's groups as signed (for the audit trail; ownership compares ``owner``).
    groups: tuple[str, ...] = ()
    container: str = ""
    command: Sequence[str] = ()
    tty: bool = False
    port: int = 0
    #: Set once the Kubernetes stream is open: only then can writes find the session.
    ready: bool = False
    input: OrderedInput | None = None
    #: Whether the input can be half-closed (close_stdin / close_write), and why not.
    can_close: bool = True
    close_refusal: str = ""
    #: Applies a terminal resize (exec with a TTY only).
    resizer: Callable[[int, int], Awaitable[None]] | None = None
    #: Ends the stream handler's wait at once with the given error (shutdown, sweep).
    abort: Callable[[AgentError], None] | None = None
    #: Why the agent ended the session (shutdown, timeout), for the stream handler to report.
    end_reason: AgentError | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    last_activity: float = dataclasses.field(default_factory=time.monotonic)
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def ref(self) -> str:
        return session_ref(self.id)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def end(self, reason: AgentError) -> None:
        """End the session from outside its stream handler (which then reports ``reason``)."""
        if self.end_reason is None:
            self.end_reason = reason
        if self.input is not None:
            self.input.end()
        if self.abort is not None:
            self.abort(self.end_reason)


class SessionRegistry:
    """The agent's open sessions (see the module docstring)."""

    def __init__(self, cluster: str, config: RuntimeConfig, metrics: AgentMetrics) -> None:
        self._cluster = cluster
        self.config = config
        self._metrics = metrics
        self._sessions: dict[bytes, Session] = {}
        self._closing = False

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, kind: SessionKind, subject: str | None = None) -> int:
        return sum(
            1
            for s in self._sessions.values()
            if s.kind is kind and (subject is None or s.owner.subject == subject)
        )

    def open(self, kind: SessionKind, identity: Identity, *, namespace: str, pod: str) -> Session:
        """Count a new session against the limits (SessionLimitError when full); not findable yet."""
        if self._closing:
            raise ShuttingDownError("the agent is shutting down; start the session again")
        owner = Owner.of(identity)
        subject_key, agent_key = _LIMIT_KEYS[kind]
        subject_limit = getattr(self.config, subject_key)
        agent_limit = getattr(self.config, agent_key)
        if self.count(kind) >= agent_limit:
            self._metrics.refusals.labels(kind=kind.value, reason="agent_limit").inc()
            raise SessionLimitError(
                f"this agent already has {agent_limit} open {kind.value} sessions (runtime.{agent_key})"
            )
        if self.count(kind, owner.subject) >= subject_limit:
            self._metrics.refusals.labels(kind=kind.value, reason="subject_limit").inc()
            raise SessionLimitError(
                f"you already have {subject_limit} open {kind.value} sessions in this cluster "
                f"(runtime.{subject_key}); end one first"
            )
        session = Session(new_session_id(self._cluster), kind, owner, namespace, pod, identity.groups)
        self._sessions[_digest(session.id)] = session
        self._metrics.sessions_active.labels(kind=kind.value).inc()
        return session

    def close(self, session: Session) -> None:
        """Forget the session and free its slot (idempotent)."""
        if self._sessions.pop(_digest(session.id), None) is None:
            return
        session.ready = False
        if session.input is not None:
            session.input.end()
        self._metrics.sessions_active.labels(kind=session.kind.value).dec()

    def find(self, session_id: str, identity: Identity, kind: SessionKind) -> Session:
        """The caller's ready session of ``kind`` with this id, else SessionNotFoundError."""
        if len(session_id) > MAX_SESSION_ID:
            raise SessionNotFoundError()
        cluster, dot, _ = session_id.partition(".")
        found = self._sessions.get(_digest(session_id))
        # Every check runs, whatever the first result: the answer must not depend on which failed.
        ok = bool(dot) & (cluster == self._cluster)
        if found is None:
            raise SessionNotFoundError()
        ok &= hmac.compare_digest(found.id.encode(), session_id.encode())
        ok &= found.owner.matches(Owner.of(identity))
        ok &= found.kind is kind
        if not (ok and found.ready):
            raise SessionNotFoundError()
        return found

    def shutdown(self) -> None:
        """The agent is stopping: refuse new sessions, end every open one with unavailable."""
        self._closing = True
        for session in list(self._sessions.values()):
            session.end(ShuttingDownError("the agent is shutting down; start the session again"))

    async def sweep(self, interval: float = SWEEP_INTERVAL) -> None:
        """Forever: end sessions past their idle timeout or lifetime (a safety net, see above)."""
        config = self.config
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self._sessions.values()):
                overdue = now - session.last_activity > config.idle_timeout_seconds + interval
                too_old = now - session.started > config.max_lifetime_seconds + interval
                if (overdue or too_old) and session.end_reason is None:
                    logger.warning("session %s outlived its limits; ending it", session.ref)
                    session.end(
                        ShuttingDownError("the session was ended by the agent's sweep (runtime limits)")
                    )


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


#: Output that piled up while the client was busy goes out in messages of up to this size.
MERGE_BYTES = 256 * 1024


def _merge(pump: Pump[Any], channel: int, payload: bytes) -> bytes:
    """``payload`` and what already waits behind it on the same channel, up to MERGE_BYTES."""
    parts = [payload]
    size = len(payload)

    def fits(item: Any) -> bool:
        return bool(item[0] == channel and size + len(item[1]) <= MERGE_BYTES)

    while size < MERGE_BYTES:
        ready = pump.take_ready(fits)
        if ready is None:
            break
        parts.append(ready[1][1])
        size += len(ready[1][1])
    return b"".join(parts) if len(parts) > 1 else payload


async def session_events(
    session: Session, pump: Pump[Any], config: RuntimeConfig, metrics: AgentMetrics
) -> AsyncIterator[Any]:
    """``(channel, bytes)`` the session's Kubernetes stream delivers, with None for a heartbeat.

    Frames of one channel that are already waiting are merged into one event (up to
    MERGE_BYTES): each message costs every hop to the client the same, whatever its size, so a
    bulk transfer goes in fewer, larger ones; interactive output is never held back for it.
    Ends when the stream ends; raises SessionExpiredError at the idle timeout or the maximum
    lifetime (naming the configuration key), and whatever error ended the pump.
    """
    last_sent = time.monotonic()
    kind = session.kind.value
    while True:
        now = time.monotonic()
        idle_at = session.last_activity + config.idle_timeout_seconds
        end_at = session.started + config.max_lifetime_seconds
        beat_at = last_sent + config.heartbeat_seconds
        got = await pump.get(max(min(idle_at, end_at, beat_at) - now, 0.0))
        if got is END:
            return
        if got is TIMEOUT:
            now = time.monotonic()
            if now >= end_at:
                metrics.refusals.labels(kind=kind, reason="max_lifetime").inc()
                raise SessionExpiredError(
                    f"the session reached its maximum lifetime of {_duration(config.max_lifetime_seconds)} "
                    "(runtime.max_lifetime_seconds); start a new one"
                )
            if now >= session.last_activity + config.idle_timeout_seconds:
                metrics.refusals.labels(kind=kind, reason="idle_timeout").inc()
                raise SessionExpiredError(
                    f"the session was idle for {_duration(config.idle_timeout_seconds)} "
                    "(runtime.idle_timeout_seconds); start a new one"
                )
            if now >= beat_at:
                yield None
                last_sent = time.monotonic()
            continue
        session.touch()
        channel, payload = got[1]
        yield channel, _merge(pump, channel, payload)
        last_sent = time.monotonic()
