"""Schema output is a usable JSON schema: real objects validate, wrong ones do not; and a CRD
changed a moment ago is described as it is now, not as it was."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from google.protobuf import json_format

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane

from .conftest import CLUSTER, CRD_GROUP, ClientFactory, install_crd, start_agent

pytestmark = pytest.mark.integration


async def _schema(make_client: ClientFactory, group: str, kind: str) -> dict[str, Any]:
    rpc = make_client()
    return json_format.MessageToDict(
        await rpc.schema(pb.SchemaRequest(cluster=CLUSTER, group=group, version="v1", kind=kind))
    )


def _errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]


async def test_deployment_schema_validates_a_real_deployment(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    schema = await _schema(make_client, "apps", "Deployment")
    jsonschema.Draft7Validator.check_schema(schema)
    deployment = control_plane.request(
        "POST",
        f"/apis/apps/v1/namespaces/{namespace}/deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "web",
                                "image": "nginx:1.27",
                                "ports": [{"containerPort": 80}],
                                "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
                            }
                        ]
                    },
                },
            },
        },
    )
    assert _errors(schema, deployment) == []

    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "three"
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    problems = _errors(schema, wrong)
    assert any("replicas" in p for p in problems)
    assert any("containerPort" in p for p in problems)


async def test_custom_resource_schema(
    make_client: ClientFactory, namespace: str, control_plane: ControlPlane
) -> None:
    schema = await _schema(make_client, CRD_GROUP, "Widget")
    widget = control_plane.request(
        "POST",
        f"/apis/{CRD_GROUP}/v1/namespaces/{namespace}/widgets",
        {
            "apiVersion": f"{CRD_GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 2, "color": "blue"},
        },
    )
    assert _errors(schema, widget) == []
    for spec in ({"size": 0}, {"size": "big"}, {"color": "red"}, {"size": 1, "color": "purple"}):
        assert _errors(schema, {**widget, "spec": spec}), spec
    assert schema["x-kubernetes-group-version-kind"] == [
        {"group": CRD_GROUP, "kind": "Widget", "version": "v1"}
    ]


async def test_schema_right_after_a_crd_changes(
    make_client: ClientFactory, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """kube-apiserver answers an outdated ``/openapi/v3/...?hash=`` URL with HTTP 301. Once it
    has published a CRD change, the very next Schema call must describe it: not the document
    cached before (stale), and no error for the redirect (it was INTERNAL). Both when the agent
    had fetched the group-version's document (``cached``) and when it only knew its URL from the
    index (``indexed``). The agent's index TTL is long here, so nothing but the fix can help."""
    suffix = uuid.uuid4().hex[:8]
    cached_group, indexed_group = f"cached-{suffix}.{CRD_GROUP}", f"indexed-{suffix}.{CRD_GROUP}"
    install_crd(control_plane, "gears", "Gear", "Namespaced", group=cached_group)
    install_crd(control_plane, "cogs", "Cog", "Namespaced", group=indexed_group)

    with start_agent(control_plane, tmp_path, discovery_ttl=600.0) as agent:
        rpc = make_client(url=agent.url)

        async def spec_fields(group: str, kind: str) -> set[str]:
            schema = await rpc.schema(pb.SchemaRequest(cluster=CLUSTER, group=group, version="v1", kind=kind))
            return set(json_format.MessageToDict(schema)["properties"]["spec"]["properties"])

        # Reads the index (both groups in it) and the document of the cached group only.
        assert await spec_fields(cached_group, "Gear") == {"size", "color", "labels"}

        install_crd(
            control_plane, "gears", "Gear", "Namespaced", group=cached_group, extra_fields=("weight",)
        )
        install_crd(control_plane, "cogs", "Cog", "Namespaced", group=indexed_group, extra_fields=("teeth",))
        # install_crd returned once kube-apiserver published both changes: ask at once.
        assert await spec_fields(indexed_group, "Cog") == {"size", "color", "labels", "teeth"}
        assert await spec_fields(cached_group, "Gear") == {"size", "color", "labels", "weight"}
        # and again (from the agent's caches, revalidated)
        assert await spec_fields(cached_group, "Gear") == {"size", "color", "labels", "weight"}

        # A new kind in a group whose document the agent has: the document changed (301) too.
        install_crd(control_plane, "sprockets", "Sprocket", "Cluster", group=cached_group)
        assert await spec_fields(cached_group, "Sprocket") == {"size", "color", "labels"}
