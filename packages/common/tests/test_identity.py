"""Identity: the checks every verified caller passes, whichever way it arrived."""

from __future__ import annotations

import dataclasses
import re

import pytest

from otterscale.common import RESERVED_PREFIXES, Identity
from otterscale.common._identity import (
    MAX_GROUPS,
    MAX_NAME_LENGTH,
    identity_name_problem,
    kubernetes_view,
    reserved_prefix,
)


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
        ("ali\nce", (), "a control character"),
        ("alice", ("dev\r\nX-Evil: 1",), "a control character"),
        ("alice", ("a\u2028b",), "a line separator"),
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
    identity = Identity("Zoë_O'Brien<zoe@example.com>", ("team,platform", "/realm/grüppe", "oidc:system:x"))
    assert identity.groups[0] == "team,platform"
    assert Identity("日本語のユーザー", ("\u00e9quipe-\u03b1",)).subject == "日本語のユーザー"


# Every padded or confusable variant the hostile review tried (issue 13), with the rule that
# refuses it. Kubernetes trims what Go trims from header values, so the first ones would have
# become system:masters, system:kube-controller-manager or collided with a real "alice".
CONFUSABLE = [
    (" system:masters", "reserved prefix 'system:'"),
    ("system:masters ", "reserved prefix 'system:'"),
    ("\tsystem:masters", "reserved prefix 'system:'"),
    (" system:kube-controller-manager", "reserved prefix 'system:'"),
    ("\r\nsystem:masters", "reserved prefix 'system:'"),
    ("SYSTEM:masters", "reserved prefix 'system:'"),
    ("System:Masters", "reserved prefix 'system:'"),
    ("\uff53\uff59\uff53\uff54\uff45\uff4d:masters", "reserved prefix 'system:'"),  # full-width (NFKC)
    ("system\uff1amasters", "reserved prefix 'system:'"),  # full-width colon
    ("alice ", "leading or trailing whitespace"),
    (" alice", "leading or trailing whitespace"),
    ("alice\u00a0", "leading or trailing whitespace"),  # NBSP is whitespace to Python
    ("\u3000alice", "leading or trailing whitespace"),  # ideographic space
    ("al ice", "a space (U+0020)"),
    ("al\u00a0ice", "a space (U+00A0)"),
    ("al\u3000ice", "a space (U+3000)"),
    ("al\u2009ice", "a space (U+2009)"),  # thin space
    ("alice\u200b", "an invisible format character (U+200B)"),  # zero-width space
    ("\u200bsystem:masters", "an invisible format character (U+200B)"),
    ("ali\u200dce", "an invisible format character (U+200D)"),  # zero-width joiner
    ("\u202ecilA", "an invisible format character (U+202E)"),  # right-to-left override
    ("\ufeffalice", "an invisible format character (U+FEFF)"),  # byte order mark
    ("ali\u00adce", "an invisible format character (U+00AD)"),  # soft hyphen
    ("ali\tce", "a control character (U+0009)"),
    ("alice\x00", "a control character (U+0000)"),
    ("ali\x7fce", "a control character (U+007F)"),
    ("ali\u0085ce", "a control character (U+0085)"),  # NEL
    ("ali\u2029ce", "a paragraph separator"),
    ("ali\ud800ce", "a surrogate"),
    ("ali\U000e0001ce", "an invisible format character"),  # language tag
    ("ali\u0378ce", "an unassigned character"),
]


@pytest.mark.parametrize(("name", "reason"), CONFUSABLE, ids=[repr(n) for n, _ in CONFUSABLE])
def test_padded_and_confusable_names_are_refused(name: str, reason: str) -> None:
    problem = identity_name_problem(name, "subject")
    assert problem is not None
    assert reason in problem
    assert name.strip() not in problem  # the value itself is never repeated
    with pytest.raises(ValueError, match=re.escape(reason)):
        Identity(name)
    with pytest.raises(ValueError, match=re.escape(reason)):
        Identity("alice", ("dev", name))


def test_what_kubernetes_sees_is_checked() -> None:
    assert kubernetes_view(" \tsystem:masters\r\n") == "system:masters"
    assert reserved_prefix(" system:masters") == "system:"
    assert reserved_prefix("oidc:system:masters") is None
    assert identity_name_problem("oidc:system:masters", "group") is None
