"""Identity: the checks every verified caller passes, whichever way it arrived."""

from __future__ import annotations

import dataclasses

import pytest

from otterscale.common import RESERVED_PREFIXES, Identity
from otterscale.common._identity import MAX_GROUPS, MAX_NAME_LENGTH


def test_identity_holds_subject_and_groups() -> None:
    identity = Identity("alice", ("dev", "ops"))
    assert identity.subject == "alice"
    assert identity.groups == ("dev", "ops")
    assert Identity("bob").groups == ()


def test_identity_is_frozen_and_hashable() -> None:
    identity = Identity("alice", ("dev",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.subject = "mallory"  # type: ignore[misc]
    assert identity == Identity("alice", ("dev",))
    assert len({identity, Identity("alice", ("dev",))}) == 1


def test_reserved_prefix_is_system() -> None:
    assert "system:" in RESERVED_PREFIXES


@pytest.mark.parametrize(
    ("subject", "groups", "reason"),
    [
        ("", (), "must not be empty"),
        ("system:admin", (), "reserved prefix"),
        ("system:serviceaccount:kube-system:default", (), "reserved prefix"),
        ("alice", ("system:masters",), "reserved prefix"),
        ("alice", ("",), "must not be empty"),
        ("ali\nce", (), "control characters"),
        ("alice", ("dev\r\nX-Evil: 1",), "control characters"),
        ("alice", ("a\u2028b",), "control characters"),
        ("alice", ("dev", "dev"), "duplicates"),
        ("x" * (MAX_NAME_LENGTH + 1), (), "longer than"),
        ("alice", tuple(f"g{i}" for i in range(MAX_GROUPS + 1)), f"more than {MAX_GROUPS}"),
    ],
)
def test_identity_refuses_bad_names(subject: str, groups: tuple[str, ...], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Identity(subject, groups)


def test_identity_refuses_non_string_values() -> None:
    with pytest.raises(ValueError, match="subject must be a string"):
        Identity(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups must be a tuple"):
        Identity("alice", ["dev"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group must be a string"):
        Identity("alice", (1,))  # type: ignore[arg-type]


def test_identity_accepts_unicode_and_punctuation() -> None:
    identity = Identity("Zoë O'Brien <zoe@example.com>", ("team, platform", "/realm/grüppe", "oidc:system:x"))
    assert identity.groups[0] == "team, platform"
