"""``otterscale server`` with test-only cluster-routed services, as a process.

    python -m otterscale.testing._launcher --route otterscale.testing.echo.v1.echo_pb2:EchoService \\
        -- server --address=127.0.0.1:PORT --config=otterscale.yaml ...

Each ``--route MODULE:SERVICE`` names a service descriptor (``MODULE.DESCRIPTOR.services_by_name
[SERVICE]``); everything after ``--`` is the ``otterscale`` command line (``server`` first). The
hub then runs exactly as ``otterscale server`` does (:func:`otterscale.hub.main`), with those
services forwarded to the agents besides its own: how the hub's tests show that it routes a
service it has no code for. :class:`~otterscale.testing.HubProcess` (``routed_services=``) starts
it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "service_descriptor"]


def service_descriptor(spec: str) -> Any:
    """The descriptor of ``MODULE:SERVICE`` (a generated ``_pb2`` module and a service in it)."""
    module_name, _, service = spec.partition(":")
    if not module_name or not service:
        raise SystemExit(f"--route {spec!r}: expected MODULE:SERVICE")
    module = importlib.import_module(module_name)
    try:
        return module.DESCRIPTOR.services_by_name[service]
    except KeyError:
        raise SystemExit(f"--route {spec!r}: {module_name} has no service {service}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``otterscale server`` with the ``--route`` services (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        raise SystemExit("usage: python -m otterscale.testing._launcher [--route MODULE:SERVICE]... -- server ...")
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="otterscale.testing._launcher")
    parser.add_argument("--route", action="append", default=[], metavar="MODULE:SERVICE")
    options = parser.parse_args(args[:split])
    command = args[split + 1 :]
    if not command or command[0] != "server":
        raise SystemExit("the command after -- must be `server ...`")
    from otterscale.hub import main as hub_main  # the hub is this tool's subject, not a dependency

    services = tuple(service_descriptor(spec) for spec in options.route)
    return hub_main(command[1:], extra_routed_services=services)


if __name__ == "__main__":
    sys.exit(main())
