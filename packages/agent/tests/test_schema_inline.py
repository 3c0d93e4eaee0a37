"""$ref inlining: every reference expanded, siblings kept, extensions kept, cycles cut."""

from __future__ import annotations

import json

from otterscale.agent._schema import find_component, inline_refs

SCHEMAS = {
    "io.example.v1.Thing": {
        "type": "object",
        "x-kubernetes-group-version-kind": [{"group": "example.io", "version": "v1", "kind": "Thing"}],
        "properties": {
            "metadata": {"allOf": [{"$ref": "#/components/schemas/io.k8s.ObjectMeta"}], "default": {}},
            "spec": {"$ref": "#/components/schemas/io.example.v1.Spec", "description": "the spec"},
            "tree": {"$ref": "#/components/schemas/io.example.v1.Node"},
        },
    },
    "io.k8s.ObjectMeta": {"type": "object", "properties": {"name": {"type": "string"}}},
    "io.example.v1.Spec": {
        "type": "object",
        "description": "generic",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {"meta": {"$ref": "#/components/schemas/io.k8s.ObjectMeta"}},
    },
    "io.example.v1.Node": {
        "type": "object",
        "properties": {
            "children": {"type": "array", "items": {"$ref": "#/components/schemas/io.example.v1.Node"}}
        },
    },
}


def test_find_component_by_gvk() -> None:
    assert find_component(SCHEMAS, "example.io", "v1", "Thing") == "io.example.v1.Thing"
    assert find_component(SCHEMAS, "example.io", "v1", "Nope") is None
    assert find_component(SCHEMAS, "", "v1", "Thing") is None


def test_inlines_everything_and_cuts_cycles() -> None:
    schema = inline_refs(SCHEMAS, "io.example.v1.Thing")
    text = json.dumps(schema)  # also proves the result is finite
    assert "$ref" not in text
    props = schema["properties"]
    assert props["metadata"]["allOf"][0]["properties"]["name"] == {"type": "string"}
    assert props["metadata"]["default"] == {}
    assert props["spec"]["description"] == "the spec"  # sibling of $ref wins
    assert props["spec"]["x-kubernetes-preserve-unknown-fields"] is True
    assert props["spec"]["properties"]["meta"]["properties"]["name"] == {"type": "string"}
    node = props["tree"]
    cut = node["properties"]["children"]["items"]
    assert cut["x-otterscale-recursive-ref"] == "io.example.v1.Node"
    assert schema["x-kubernetes-group-version-kind"][0]["kind"] == "Thing"


def test_input_is_not_modified() -> None:
    before = json.dumps(SCHEMAS, sort_keys=True)
    inline_refs(SCHEMAS, "io.example.v1.Thing")
    assert json.dumps(SCHEMAS, sort_keys=True) == before
