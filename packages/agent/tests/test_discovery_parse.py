"""Aggregated and legacy discovery documents -> resources; stale groups and subresources left out."""

from __future__ import annotations

from otterscale.agent._discovery import APIResourceInfo, _parse_aggregated, _parse_legacy


def test_aggregated() -> None:
    doc = {
        "kind": "APIGroupDiscoveryList",
        "items": [
            {
                "metadata": {"name": "apps"},
                "versions": [
                    {
                        "version": "v1",
                        "freshness": "Current",
                        "resources": [
                            {
                                "resource": "deployments",
                                "responseKind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                                "scope": "Namespaced",
                                "verbs": ["get", "list"],
                                "shortNames": ["deploy"],
                                "subresources": [{"subresource": "scale"}],
                            }
                        ],
                    }
                ],
            },
            {
                "metadata": {"name": "metrics.k8s.io"},
                "versions": [
                    {"version": "v1beta1", "freshness": "Stale", "resources": [{"resource": "pods"}]}
                ],
            },
        ],
    }
    assert _parse_aggregated(doc) == [
        APIResourceInfo("apps", "v1", "deployments", "Deployment", True, ("get", "list"), ("deploy",))
    ]


def test_legacy_skips_subresources() -> None:
    doc = {
        "resources": [
            {"name": "pods", "kind": "Pod", "namespaced": True, "verbs": ["get"], "shortNames": ["po"]},
            {"name": "pods/log", "kind": "Pod", "namespaced": True, "verbs": ["get"]},
            {"name": "nodes", "kind": "Node", "namespaced": False},
        ]
    }
    assert [(r.resource, r.namespaced, r.group) for r in _parse_legacy("", "v1", doc)] == [
        ("pods", True, ""),
        ("nodes", False, ""),
    ]
