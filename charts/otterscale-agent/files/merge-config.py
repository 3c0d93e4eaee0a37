"""Assemble otterscale.yaml from the chart's ConfigMap and Secret (run by the `config` init container).

    python -I merge-config.py BASE.yaml SECRET.yaml OUT.yaml

The hub and the agent read one configuration file, but its secret keys (the tunnel key seed, the
agents' passwords) must not live in a ConfigMap. The chart therefore keeps the non-secret part in a
ConfigMap and the secret part, as YAML of the same shape, in a Secret; this script deep-merges the
Secret's mappings over the ConfigMap's and writes the result (mode 0600) into a memory-backed
emptyDir that the service then reads as its --config. A key in both with a non-mapping value is the
Secret's. The service itself validates the result (unknown keys, missing keys, ports...).

It prints key paths, never values. Runs with the image's Python and PyYAML (a dependency of
otterscale-common); the same file ships in both charts (a test checks they are identical).
"""

from __future__ import annotations

import os
import sys

import yaml


def _load(path: str, what: str) -> dict[str, object]:
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except OSError as exc:
        raise SystemExit(f"merge-config: cannot read the {what} {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SystemExit(f"merge-config: the {what} {path} is not valid YAML{where}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SystemExit(f"merge-config: the {what} {path} must be a YAML mapping")
    return document


def merge(base: dict[str, object], overlay: dict[str, object], prefix: str = "") -> list[str]:
    """Deep-merge ``overlay`` into ``base`` in place; returns the dotted paths taken from the overlay."""
    taken = []
    for key, value in overlay.items():
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            taken += merge(current, value, f"{prefix}{key}.")
        else:
            base[key] = value
            taken.append(f"{prefix}{key}")
    return taken


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: merge-config.py BASE.yaml SECRET.yaml OUT.yaml\n")
        return 2
    base_path, secret_path, out_path = argv
    config = _load(base_path, "configuration (ConfigMap)")
    secret = _load(secret_path, "secret configuration (Secret)")
    taken = merge(config, secret)
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"merge-config: wrote {out_path}; from the Secret: {', '.join(taken) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
