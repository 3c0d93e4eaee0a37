"""Parse the manifests of Create and Apply: one YAML or JSON object, safely and with limits.

Never constructs arbitrary Python objects (PyYAML's safe loader only, libyaml's C parser when
available), never follows an alias bomb or a recursive alias (a node budget and a size budget stop
the walk: "billion laughs" and one long string aliased a thousand times are refused alike), never
accepts more than :data:`MAX_MANIFEST_BYTES`, and only returns plain JSON values: YAML timestamps
stay strings (as they do for kubectl), non-string keys become strings; NaN/Infinity, numbers too
large for a double, lone UTF-16 surrogates and binary are refused. Every failure is a
:class:`~._errors.ManifestError` (invalid_argument) with a message that names the problem and, for
YAML syntax errors, the position; no other exception escapes, whatever the bytes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any, cast

import yaml

from ._errors import ManifestError

logger = logging.getLogger(__name__)

__all__ = ["MAX_MANIFEST_BYTES", "parse_manifest"]

#: Kubernetes refuses request bodies over 3 MiB; anything larger cannot succeed anyway.
MAX_MANIFEST_BYTES = 3 * 1024 * 1024
#: Scalars + containers after alias expansion; generous for any real object.
_MAX_NODES = 1_000_000
#: Characters of strings and keys plus one per node, after alias expansion. A document without
#: aliases stays below this (every node or character costs at least a byte of input); with aliases
#: it bounds what could ever be sent on (Kubernetes refuses more than 3 MiB anyway).
_MAX_EXPANDED_SIZE = 2 * MAX_MANIFEST_BYTES
_MAX_DEPTH = 100
#: Digits of an integer: Python refuses to convert more than 4300 (sys.int_info), and anything
#: beyond ~310 digits is not a finite double, which is all a protobuf Struct can hold.
_MAX_INT_DIGITS = 400

# libyaml's parser is ~50 times faster than the pure-Python one (3 MiB in well under a second,
# not tens of seconds); its constructor and resolver are the same safe Python classes.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _ManifestLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader without the timestamp resolver: ``2024-01-01`` stays the string it is in JSON."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = str(node.value)
        if sum(char.isdigit() for char in value) > _MAX_INT_DIGITS:
            raise ManifestError(f"manifest contains an integer of more than {_MAX_INT_DIGITS} digits")
        return cast("int", super().construct_yaml_int(node))


_ManifestLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ManifestLoader.add_constructor("tag:yaml.org,2002:int", _ManifestLoader.construct_yaml_int)


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """The single object in ``raw`` (UTF-8 YAML or JSON), with ``apiVersion`` and ``kind`` set."""
    if not raw or not raw.strip():
        raise ManifestError("manifest is empty")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(raw)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    obj = _load(text)
    if not isinstance(obj, dict):
        raise ManifestError(f"manifest must be a single object, not {_json_type(obj)}")
    obj = cast("dict[str, Any]", _to_json(obj, [0, 0], 0))
    for field in ("apiVersion", "kind"):
        value = obj.get(field)
        if not isinstance(value, str) or not value:
            raise ManifestError(f"manifest has no {field}")
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ManifestError("manifest metadata must be an object")
    return obj


def _load(text: str) -> Any:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        # JSON is the common machine-written case; the JSON parser is faster and its errors are
        # clearer. Fall through to YAML only if it is not JSON after all (YAML flow style).
        try:
            return json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
        except RecursionError as exc:
            raise ManifestError(f"manifest nests deeper than {_MAX_DEPTH} levels") from exc
        except ValueError:
            pass
    try:
        documents = [doc for doc in yaml.load_all(text, Loader=_ManifestLoader) if doc is not None]
    except yaml.MarkedYAMLError as exc:
        if "maximum nesting depth" in str(exc.problem):  # libyaml's own limit (1000 levels)
            raise ManifestError(f"manifest nests deeper than {_MAX_DEPTH} levels") from exc
        where = ""
        if exc.problem_mark is not None:
            where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
        raise ManifestError(f"manifest is not valid YAML or JSON: {exc.problem or exc}{where}") from exc
    except RecursionError as exc:
        raise ManifestError(f"manifest nests deeper than {_MAX_DEPTH} levels") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest is not valid YAML or JSON: {exc}") from exc
    except (ValueError, TypeError, OverflowError, IndexError, KeyError, AttributeError) as exc:
        # PyYAML's constructors fail like this on explicitly tagged scalars they cannot read
        # (``!!int ""`` is an IndexError, ``!!timestamp x`` a ValueError): the input's fault.
        raise ManifestError(
            "manifest is not valid YAML or JSON: a value cannot be read as the type its tag or form "
            "says (for example an empty !!int or a malformed !!timestamp)"
        ) from exc
    if not documents:
        raise ManifestError("manifest is empty")
    if len(documents) > 1:
        raise ManifestError(f"manifest must contain one object, found {len(documents)} documents")
    return documents[0]


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"manifest contains {name}, which is not valid JSON")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ManifestError(f"manifest contains an integer of more than {_MAX_INT_DIGITS} digits")
    return int(text)


def _to_json(value: Any, budget: list[int], depth: int) -> Any:
    """A copy of ``value`` made only of JSON types; enforces the node and size budgets and depth.

    ``budget`` is ``[nodes, size]`` so far (shared by the whole walk).
    """
    budget[0] += 1
    budget[1] += 1
    if budget[0] > _MAX_NODES or budget[1] > _MAX_EXPANDED_SIZE:
        raise ManifestError("manifest is too large after expanding YAML aliases")
    if depth > _MAX_DEPTH:
        raise ManifestError(f"manifest nests deeper than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        return {_key(k, budget): _to_json(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json(v, budget, depth + 1) for v in value]
    if isinstance(value, str):
        return _text(value, budget)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Kubernetes and protobuf Struct hold numbers as doubles: refuse what no double can hold.
        if abs(value) > sys.float_info.max:
            raise ManifestError("manifest contains an integer too large for a number (over 1.8e308)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ManifestError("manifest contains a non-finite number (NaN or Infinity)")
        return value
    raise ManifestError(f"manifest contains a {_json_type(value)} value, which JSON cannot hold")


def _text(value: str, budget: list[int]) -> str:
    budget[1] += len(value)
    if budget[1] > _MAX_EXPANDED_SIZE:
        raise ManifestError("manifest is too large after expanding YAML aliases")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ManifestError(
                f"manifest contains a lone UTF-16 surrogate (U+{ord(value[exc.start]):04X}), "
                "which is not valid Unicode"
            ) from None
    return value


def _key(key: Any, budget: list[int]) -> str:
    # sigs.k8s.io/yaml (what kubectl uses) turns scalar keys into their string form.
    if isinstance(key, str):
        return _text(key, budget)
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int | float):
        return str(key)
    raise ManifestError(f"manifest has a {_json_type(key)} as a key; keys must be strings")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool | int | float):
        return "a scalar"
    return type(value).__name__
