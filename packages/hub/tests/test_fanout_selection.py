"""Which clusters a fan-out call covers: access allow-lists, names, labels (pure)."""

from __future__ import annotations

import pytest

from otterscale.common import AccessConfig, Identity
from otterscale.hub._access import AccessPolicy
from otterscale.hub._fanout.errors import InvalidFanoutRequestError
from otterscale.hub._fanout.selection import ClusterDirectory, Resolution
from otterscale.resource.v1.multicluster_pb2 import ClusterSelection

LABELS = {
    "dev-eu": {"env": "dev", "region": "eu"},
    "dev-us": {"env": "dev", "region": "us"},
    "prod-eu": {"env": "prod", "region": "eu"},
    "prod-us": {"env": "prod", "region": "us"},
}
ALICE = Identity("alice", ("team-a",))
BOB = Identity("bob", ("contractors",))
CAROL = Identity("carol")
AUDITOR = Identity("auditor")

ACCESS = AccessConfig.model_validate(
    {
        "default": "none",
        "rules": [
            {"groups": ["team-a"], "clusters": ["*"]},
            {"groups": ["contractors"], "clusters": ["dev-*"]},
            {"subjects": ["auditor"], "cluster_labels": "env=prod"},
        ],
    }
)


def _directory(access: AccessConfig | None = ACCESS, max_clusters: int = 100) -> ClusterDirectory:
    return ClusterDirectory(LABELS, AccessPolicy(access, LABELS), max_clusters=max_clusters)


def _resolve(
    identity: Identity, names: list[str] | None = None, selector: str = "", **kw: object
) -> Resolution:
    return _directory(**kw).resolve(identity, ClusterSelection(clusters=names or [], label_selector=selector))  # type: ignore[arg-type]


def test_no_access_section_allows_every_cluster() -> None:
    assert _resolve(CAROL, access=None).clusters == tuple(sorted(LABELS))


def test_rules_restrict_and_default_none_refuses_the_rest() -> None:
    assert _resolve(ALICE).clusters == tuple(sorted(LABELS))
    assert _resolve(BOB).clusters == ("dev-eu", "dev-us")
    assert _resolve(AUDITOR).clusters == ("prod-eu", "prod-us")
    assert _resolve(CAROL) == Resolution((), ())


def test_default_all_leaves_unmatched_callers_alone() -> None:
    access = AccessConfig.model_validate({"rules": [{"groups": ["contractors"], "clusters": ["dev-eu"]}]})
    assert _resolve(CAROL, access=access).clusters == tuple(sorted(LABELS))
    assert _resolve(BOB, access=access).clusters == ("dev-eu",)


def test_a_forbidden_name_is_exactly_an_unknown_name() -> None:
    forbidden = _resolve(BOB, ["prod-eu", "dev-eu"])
    unknown = _resolve(BOB, ["no-such", "dev-eu"])
    assert forbidden.clusters == unknown.clusters == ("dev-eu",)
    assert forbidden.unknown == ("prod-eu",)
    assert unknown.unknown == ("no-such",)


def test_labels_select_among_allowed_clusters_only() -> None:
    assert _resolve(ALICE, selector="region=eu").clusters == ("dev-eu", "prod-eu")
    assert _resolve(BOB, selector="env=prod").clusters == ()
    assert _resolve(ALICE, ["dev-eu", "prod-us"], "env=prod").clusters == ("prod-us",)


def test_duplicates_collapse() -> None:
    assert _resolve(ALICE, ["dev-eu", "dev-eu"]).clusters == ("dev-eu",)


@pytest.mark.parametrize(
    ("names", "selector", "message"),
    [
        ([f"c{i}" for i in range(4)], "", "selection.clusters names 4 clusters; the limit is 3"),
        ([], "", "the selection covers 4 clusters; the limit is 3"),
        ([""], "", "selection.clusters: '' is not a cluster name"),
        (["x" * 300], "", "is not a cluster name"),
        ([], "env in (", "selection.label_selector:"),
    ],
)
def test_oversized_and_bad_selections_are_invalid(names: list[str], selector: str, message: str) -> None:
    with pytest.raises(InvalidFanoutRequestError) as caught:
        _resolve(ALICE, names, selector, max_clusters=3)
    assert message in str(caught.value)
    assert "x" * 100 not in str(caught.value)  # hostile input is not echoed at length
