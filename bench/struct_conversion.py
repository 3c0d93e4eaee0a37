"""Micro-benchmark: Kubernetes JSON -> google.protobuf.Struct, the agent's hot path for big Lists.

``python bench/struct_conversion.py [--items 5000] [--repeat 3]`` (dev venv). Builds a
ConfigMap list like the suite's (about 1 KiB per object), then times, in CPU seconds (best of
``--repeat``): ``json.loads`` and ``orjson.loads`` of the body, ``json_format.ParseDict`` into Structs,
``Struct.update``, and the agent's wire encoder (``otterscale.agent._structs.struct_bytes``, a
private helper: this script is the measurement its docstring cites), and checks that the
encoder's result equals ``ParseDict``'s. Loopback-free and quick (seconds).
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf import json_format, struct_pb2

from otterscale.agent._structs import struct_bytes


def configmap_list(items: int) -> bytes:
    objects = [
        {
            "metadata": {
                "name": f"cm-{i:05d}",
                "namespace": "otterscale-bench-list",
                "uid": secrets.token_hex(16),
                "resourceVersion": str(1000 + i),
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "data": {"payload": secrets.token_hex(400)},
        }
        for i in range(items)
    ]
    return json.dumps({"kind": "ConfigMapList", "apiVersion": "v1", "items": objects}).encode()


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.process_time()
        result = fn()
        times.append(time.process_time() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    body = configmap_list(args.items)
    loads_s, listed = best(lambda: json.loads(body), args.repeat)
    items = listed["items"]

    def parse_dict() -> list[struct_pb2.Struct]:
        return [json_format.ParseDict(item, struct_pb2.Struct()) for item in items]

    def update() -> list[struct_pb2.Struct]:
        out = []
        for item in items:
            message = struct_pb2.Struct()
            message.update(item)
            out.append(message)
        return out

    def encoder() -> list[struct_pb2.Struct]:
        return [struct_pb2.Struct.FromString(struct_bytes(item)) for item in items]

    print(f"{args.items} ConfigMaps, {len(body) / 1e6:.1f} MB of JSON; CPU ms, best of {args.repeat}")
    print(f"  json.loads            {loads_s * 1000:8.1f}")
    print(f"  orjson.loads          {best(lambda: orjson.loads(body), args.repeat)[0] * 1000:8.1f}")
    reference = None
    for name, fn in (
        ("json_format.ParseDict", parse_dict),
        ("Struct.update", update),
        ("struct_bytes", encoder),
    ):
        seconds, result = best(fn, args.repeat)
        reference = reference or result
        print(f"  {name:<21} {seconds * 1000:8.1f}")
    if reference != encoder():
        raise SystemExit("struct_bytes disagrees with json_format.ParseDict")
    print("  struct_bytes == ParseDict: ok")


if __name__ == "__main__":
    main()
