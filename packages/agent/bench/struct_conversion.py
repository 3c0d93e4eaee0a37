"""JSON list -> ListResponse of Structs: three ways, timed on 5,000 ConfigMaps (prints; no asserts).

    python packages/agent/bench/struct_conversion.py [--items 5000] [--repeat 5]

Each way starts from the raw JSON bytes kube-apiserver sends and ends with the ListResponse the
agent returns (managedFields stripped); CPU time (process_time), best of ``--repeat``:

- ``json_format.ParseDict`` into each item's Struct (protobuf's reference converter);
- ``Struct.update`` (protobuf's well-known-type helper);
- the agent's wire encoder (``otterscale.agent._structs``) + one ``MergeFromString``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from otterscale.agent._structs import field_bytes, struct_bytes
from otterscale.resource.v1 import resource_pb2 as pb


def configmap(i: int) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"cm-{i:05d}",
            "namespace": "bench",
            "uid": f"0f8d7e1c-3c7a-4b1e-9a55-{i:012d}",
            "resourceVersion": str(1000 + i),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": "bench", "index": str(i)},
            "managedFields": [
                {
                    "manager": "python",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-01-01T00:00:00Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:data": {".": {}, "f:a": {}, "f:b": {}, "f:c": {}}},
                }
            ],
        },
        "data": {"a": "x" * 100, "b": "hello world", "c": str(i)},
    }


def strip(item: dict[str, Any]) -> dict[str, Any]:
    item["metadata"].pop("managedFields", None)
    item.setdefault("kind", "ConfigMap")
    item.setdefault("apiVersion", "v1")
    return item


def via_parse_dict(body: bytes) -> pb.ListResponse:
    listed = json.loads(body)
    response = pb.ListResponse(resource_version=listed["metadata"]["resourceVersion"])
    for item in listed["items"]:
        json_format.ParseDict(strip(item), response.items.add().object, max_recursion_depth=10_000)
    return response


def via_update(body: bytes) -> pb.ListResponse:
    listed = json.loads(body)
    response = pb.ListResponse(resource_version=listed["metadata"]["resourceVersion"])
    for item in listed["items"]:
        response.items.add().object.update(strip(item))
    return response


def via_wire(body: bytes) -> pb.ListResponse:
    listed = json.loads(body)
    response = pb.ListResponse(resource_version=listed["metadata"]["resourceVersion"])
    response.MergeFromString(
        field_bytes(4, (field_bytes(1, (struct_bytes(strip(i)),)) for i in listed["items"]))
    )
    return response


def best(fn: Callable[[bytes], pb.ListResponse], body: bytes, repeat: int) -> tuple[float, pb.ListResponse]:
    times = []
    result = pb.ListResponse()
    for _ in range(repeat):
        started = time.process_time()
        result = fn(body)
        times.append(time.process_time() - started)
    return min(times) * 1000, result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    body = json.dumps(
        {
            "kind": "ConfigMapList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "99"},
            "items": [configmap(i) for i in range(args.items)],
        }
    ).encode()
    print(f"{args.items} ConfigMaps, {len(body) / 1e6:.1f} MB of JSON; CPU ms, best of {args.repeat}")
    decode = min(_time(lambda: json.loads(body)) for _ in range(args.repeat))
    print(f"  {'json.loads alone':34s} {decode:8.1f}")
    results = {}
    for name, fn in (
        ("json.loads + json_format.ParseDict", via_parse_dict),
        ("json.loads + Struct.update", via_update),
        ("json.loads + wire encoder (agent)", via_wire),
    ):
        elapsed, results[name] = best(fn, body, args.repeat)
        print(f"  {name:34s} {elapsed:8.1f}")
    first, *rest = results.values()
    assert all(first == other for other in rest), "the three ways disagree"
    print("  (all three results are equal)")
    return 0


def _time(fn: Callable[[], Any]) -> float:
    started = time.process_time()
    fn()
    return (time.process_time() - started) * 1000


if __name__ == "__main__":
    raise SystemExit(main())
