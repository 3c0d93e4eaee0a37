"""Aggregated and legacy discovery documents -> resources and subresources, as client-go's
``ServerGroupsAndResources`` (the original service's Discovery) turns them into APIResources;
stale group-versions left out."""

from __future__ import annotations

from otterscale.agent._discovery import APIResourceInfo, _parse_aggregated, _parse_legacy

AUTOSCALING_SCALE = {"group": "autoscaling", "version": "v1", "kind": "Scale"}


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
                                "subresources": [
                                    {
                                        "subresource": "scale",
                                        "responseKind": AUTOSCALING_SCALE,
                                        "verbs": ["get", "patch", "update"],
                                    },
                                    # client-go drops a subresource without a GVK
                                    {"subresource": "broken", "verbs": ["get"]},
                                    {"subresource": "empty", "responseKind": {}, "verbs": ["get"]},
                                ],
                            },
                            {
                                # no GVK: the resource itself is dropped, its subresources kept
                                "resource": "nokinds",
                                "scope": "Cluster",
                                "verbs": ["get"],
                                "subresources": [
                                    {
                                        "subresource": "status",
                                        "responseKind": {"group": "apps", "version": "v1", "kind": "NoKind"},
                                        "verbs": ["get"],
                                    }
                                ],
                            },
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
    parsed = _parse_aggregated(doc)
    assert parsed == [
        APIResourceInfo("apps", "v1", "deployments", "Deployment", True, ("get", "list"), ("deploy",)),
        APIResourceInfo("apps", "v1", "deployments/scale", "Scale", True, ("get", "patch", "update")),
        APIResourceInfo("apps", "v1", "nokinds/status", "NoKind", False, ("get",)),
    ]
    assert [r.is_subresource for r in parsed] == [False, True, True]


def test_legacy_lists_subresources() -> None:
    doc = {
        "resources": [
            {"name": "pods", "kind": "Pod", "namespaced": True, "verbs": ["get"], "shortNames": ["po"]},
            {"name": "pods/log", "kind": "Pod", "namespaced": True, "verbs": ["get"]},
            {
                "name": "pods/eviction",
                "group": "policy",
                "version": "v1",
                "kind": "Eviction",
                "namespaced": True,
            },
            {"name": "nodes", "kind": "Node", "namespaced": False},
        ]
    }
    assert [(r.resource, r.kind, r.namespaced, r.group) for r in _parse_legacy("", "v1", doc)] == [
        ("pods", "Pod", True, ""),
        ("pods/log", "Pod", True, ""),
        ("pods/eviction", "Eviction", True, ""),
        ("nodes", "Node", False, ""),
    ]
