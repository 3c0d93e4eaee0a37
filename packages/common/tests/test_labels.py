"""Cluster labels and label selectors (Kubernetes syntax and semantics), pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otterscale.common import LabelSelector, LabelSyntaxError

LABELS = {"env": "prod", "region": "eu", "example.com/tier": "1"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("env=prod", True),
        ("env==prod", True),
        ("env=dev", False),
        ("env!=dev", True),
        ("missing!=x", True),  # != holds when the label is missing, as in Kubernetes
        ("env", True),
        ("!env", False),
        ("!missing", True),
        ("region in (eu, us)", True),
        ("region in (us)", False),
        ("region notin (us)", True),
        ("missing notin (us)", True),
        ("env=prod,region=us", False),
        ("env=prod , region in(eu) ,example.com/tier=1", True),
        ("empty=", False),
    ],
)
def test_selectors_match_like_kubernetes(selector: str, matches: bool) -> None:
    assert LabelSelector.parse(selector).matches(LABELS) is matches


@pytest.mark.parametrize(
    ("selector", "reason"),
    [
        ("env=", None),  # the empty value is valid
        ("env in ()", "empty"),
        ("env in (a", "')'"),
        ("env in a", "'(value, ...)'"),
        ("env ~ a", "unknown operator"),
        ("env=prod,", "ends with ','"),
        ("=prod", "expected a label key"),
        ("env=prod x", "expected ','"),
        ("-bad=1", "label key"),
        ("Bad.Prefix/x=1", "prefix"),
        ("env=" + "v" * 64, "label value"),
        ("!", "followed by a label key"),
    ],
)
def test_bad_selectors_say_what_is_wrong(selector: str, reason: str | None) -> None:
    if reason is None:
        LabelSelector.parse(selector)
        return
    with pytest.raises(LabelSyntaxError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        LabelSelector.parse(selector)


def test_selectors_are_bounded() -> None:
    with pytest.raises(LabelSyntaxError, match="longer than"):
        LabelSelector.parse("a" * 5000)
    with pytest.raises(LabelSyntaxError, match="requirements"):
        LabelSelector.parse(",".join(f"k{i}" for i in range(65)))


@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        selector = LabelSelector.parse(text)
    except LabelSyntaxError:
        return
    selector.matches(LABELS)
