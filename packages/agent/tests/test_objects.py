"""REST paths and the List/Watch object clean-up."""

from __future__ import annotations

import pytest

from otterscale.agent._discovery import APIResourceInfo
from otterscale.agent._errors import InvalidRequestError
from otterscale.agent._objects import LAST_APPLIED, clean_object, collection_path, object_path, with_type_meta

CM = APIResourceInfo("", "v1", "configmaps", "ConfigMap", True)
NODE = APIResourceInfo("", "v1", "nodes", "Node", False)
DEPLOY = APIResourceInfo("apps", "v1", "deployments", "Deployment", True)


def test_paths() -> None:
    assert collection_path(CM, "") == "/api/v1/configmaps"
    assert collection_path(CM, "a") == "/api/v1/namespaces/a/configmaps"
    assert collection_path(NODE, "ignored") == "/api/v1/nodes"
    assert object_path(DEPLOY, "a", "web") == "/apis/apps/v1/namespaces/a/deployments/web"
    assert object_path(NODE, "", "n1") == "/api/v1/nodes/n1"
    assert object_path(CM, "a", "x:y@z") == "/api/v1/namespaces/a/configmaps/x%3Ay%40z"


@pytest.mark.parametrize("name", ["", "..", ".", "a/b", "a\nb"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidRequestError):
        object_path(CM, "a", name)


def test_namespace_required_for_namespaced_objects() -> None:
    with pytest.raises(InvalidRequestError, match="namespace is required"):
        object_path(CM, "", "x")
    with pytest.raises(InvalidRequestError):
        collection_path(CM, "../kube-system")


def test_clean_object() -> None:
    obj = {
        "metadata": {
            "name": "x",
            "managedFields": [{"manager": "m"}],
            "annotations": {LAST_APPLIED: "{}"},
        }
    }
    assert clean_object(obj) == {"metadata": {"name": "x"}}
    kept = {"metadata": {"annotations": {LAST_APPLIED: "{}", "keep": "me"}}}
    assert clean_object(kept) == {"metadata": {"annotations": {"keep": "me"}}}


def test_type_meta_filled_only_when_missing() -> None:
    assert with_type_meta({}, DEPLOY) == {"kind": "Deployment", "apiVersion": "apps/v1"}
    assert with_type_meta({"kind": "K", "apiVersion": "x/v9"}, DEPLOY) == {"kind": "K", "apiVersion": "x/v9"}
