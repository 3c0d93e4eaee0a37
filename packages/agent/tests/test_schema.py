"""Schema output is a usable JSON schema: real objects validate, wrong ones do not."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from google.protobuf import json_format

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane

from .conftest import CLUSTER, CRD_GROUP, ClientFactory

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
