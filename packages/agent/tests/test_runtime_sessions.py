"""Session ids, ownership and limits (``_sessions.SessionRegistry``): hijack attempts are not_found."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator

import pytest

from otterscale.agent._errors import SessionLimitError, SessionNotFoundError, ShuttingDownError
from otterscale.agent._metrics import AgentMetrics
from otterscale.agent._runtime import SessionKind, new_session_id, session_ref
from otterscale.agent._runtime._pump import Pump
from otterscale.agent._runtime._sessions import MERGE_BYTES, Owner, SessionRegistry, session_events
from otterscale.common import Identity, RuntimeConfig

ALICE = Identity("alice", ("team-a", "team-b"))
BOB = Identity("bob", ("team-a", "team-b"))
EXEC, PF = SessionKind.EXEC, SessionKind.PORT_FORWARD


def registry(cluster: str = "prod", **limits: int) -> SessionRegistry:
    return SessionRegistry(cluster, RuntimeConfig(**limits), AgentMetrics())


def ready(reg: SessionRegistry, identity: Identity = ALICE, kind: SessionKind = EXEC) -> str:
    session = reg.open(kind, identity, namespace="ns", pod="p")
    session.ready = True
    return session.id


def test_ids_route_by_cluster_and_carry_128_random_bits() -> None:
    ids = {new_session_id("prod") for _ in range(1000)}
    assert len(ids) == 1000
    for session_id in list(ids)[:20]:
        cluster, token = session_id.split(".", 1)
        assert cluster == "prod"
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", token)
        assert len(base64.urlsafe_b64decode(token + "==")) == 16


def test_the_owner_finds_a_ready_session() -> None:
    reg = registry()
    session_id = ready(reg)
    assert reg.find(session_id, ALICE, EXEC).id == session_id
    # The groups are compared as a set: the same groups in another order are the same caller.
    assert reg.find(session_id, Identity("alice", ("team-b", "team-a")), EXEC).id == session_id


@pytest.mark.parametrize(
    "attempt",
    [
        "other subject",
        "other groups",
        "no groups",
        "other kind",
        "other cluster",
        "guessed",
        "malformed",
        "huge",
    ],
)
def test_hijack_attempts_are_not_found_with_one_message(attempt: str) -> None:
    reg = registry()
    session_id = ready(reg)
    caller, kind, asked = ALICE, EXEC, session_id
    if attempt == "other subject":
        caller = BOB
    elif attempt == "other groups":
        caller = Identity("alice", ("team-a", "admins"))
    elif attempt == "no groups":
        caller = Identity("alice")
    elif attempt == "other kind":
        kind = PF
    elif attempt == "other cluster":
        asked = "dev." + session_id.split(".", 1)[1]
    elif attempt == "guessed":
        asked = new_session_id("prod")
    elif attempt == "malformed":
        asked = session_id.replace(".", "")
    else:
        asked = session_id + "A" * 10_000
    with pytest.raises(SessionNotFoundError) as caught:
        reg.find(asked, caller, kind)
    assert caught.value.message == SessionNotFoundError.MESSAGE
    assert session_id.split(".", 1)[1] not in caught.value.message


def test_a_session_is_findable_only_while_ready_and_open() -> None:
    reg = registry()
    session = reg.open(EXEC, ALICE, namespace="ns", pod="p")
    with pytest.raises(SessionNotFoundError):
        reg.find(session.id, ALICE, EXEC)  # the exec has not started yet
    session.ready = True
    reg.find(session.id, ALICE, EXEC)
    reg.close(session)
    with pytest.raises(SessionNotFoundError):
        reg.find(session.id, ALICE, EXEC)
    reg.close(session)  # idempotent


def test_per_subject_limit_names_its_key_and_frees_on_close() -> None:
    reg = registry(max_exec_sessions_per_subject=2)
    first = reg.open(EXEC, ALICE, namespace="ns", pod="p")
    reg.open(EXEC, ALICE, namespace="ns", pod="p")
    with pytest.raises(SessionLimitError, match=r"runtime\.max_exec_sessions_per_subject"):
        reg.open(EXEC, ALICE, namespace="ns", pod="p")
    reg.open(EXEC, BOB, namespace="ns", pod="p")  # another subject has its own budget
    reg.open(PF, ALICE, namespace="ns", pod="p")  # and port-forwards are counted apart
    reg.close(first)
    reg.open(EXEC, ALICE, namespace="ns", pod="p")


def test_per_agent_limit() -> None:
    reg = registry(max_port_forward_sessions=2)
    reg.open(PF, ALICE, namespace="ns", pod="p")
    reg.open(PF, BOB, namespace="ns", pod="p")
    with pytest.raises(SessionLimitError, match=r"runtime\.max_port_forward_sessions\b"):
        reg.open(PF, Identity("carol"), namespace="ns", pod="p")


def test_shutdown_ends_sessions_and_refuses_new_ones() -> None:
    reg = registry()
    session = reg.open(EXEC, ALICE, namespace="ns", pod="p")
    reasons: list[Exception] = []
    session.abort = reasons.append
    reg.shutdown()
    assert isinstance(session.end_reason, ShuttingDownError)
    assert reasons == [session.end_reason]
    with pytest.raises(ShuttingDownError):
        reg.open(EXEC, ALICE, namespace="ns", pod="p")


def test_refs_are_short_and_do_not_reveal_the_id() -> None:
    session_id = new_session_id("prod")
    ref = session_ref(session_id)
    assert re.fullmatch(r"[0-9a-f]{12}", ref)
    assert ref not in session_id
    assert session_ref(session_id) == ref


def test_owner_group_encoding_is_unambiguous() -> None:
    assert Owner.of(Identity("a", ("x,y",))) != Owner.of(Identity("a", ("x", "y")))
    assert Owner.of(Identity("a", ("xy",))) != Owner.of(Identity("a", ("x", "y")))


async def test_waiting_output_of_one_channel_is_merged_up_to_the_limit() -> None:
    chunk = b"x" * (32 * 1024)
    frames = [(1, b"a"), (1, b"b"), (2, b"err")] + [(1, chunk)] * 10

    async def source() -> AsyncIterator[tuple[int, bytes]]:
        for frame in frames:
            yield frame

    reg = registry()
    session = reg.open(EXEC, ALICE, namespace="ns", pod="p")
    pump = Pump({"s": source()}, name="test-merge", size=len(frames))
    for _ in range(len(frames) + 5):
        await asyncio.sleep(0)  # everything is waiting in the buffer
    events = []
    try:
        async for event in session_events(session, pump, reg.config, AgentMetrics()):
            events.append(event)
    finally:
        await pump.close()
    assert events[0] == (1, b"ab")  # merged
    assert events[1] == (2, b"err")  # another channel: never merged across
    assert [len(payload) for _, payload in events[2:]] == [MERGE_BYTES, 2 * len(chunk)]
    assert b"".join(p for c, p in events if c == 1) == b"ab" + chunk * 10
