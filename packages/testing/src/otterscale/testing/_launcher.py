"""``otterscale server`` with test-only services, as a process.

    python -m otterscale.testing._launcher --route otterscale.testing.echo.v1.echo_pb2:EchoService \\
        -- server --address=127.0.0.1:PORT --config=otterscale.yaml ...

Each ``--route MODULE:SERVICE`` names a service descriptor (``MODULE.DESCRIPTOR.services_by_name
[SERVICE]``) the hub forwards to the agents by cluster; each ``--serve MODULE:SERVICE=MODULE:FACTORY``
one the hub answers itself, with the application ``FACTORY(context)`` makes (a hub-served service,
see ``otterscale.hub._services.HubService``). Everything after ``--`` is the ``otterscale``
command line (``server`` first). The hub then runs exactly as ``otterscale server`` does
(:func:`otterscale.hub.main`), with those services besides its own: how the hub's tests show that
it routes or serves a service it has no code for. :class:`~otterscale.testing.HubProcess`
(``routed_services=``, ``hub_services=``) starts it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``otterscale server`` with the ``--route`` services (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        raise SystemExit(
            "usage: python -m otterscale.testing._launcher [--route MODULE:SERVICE]... -- server ..."
        )
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="otterscale.testing._launcher")
    parser.add_argument("--route", action="append", default=[], metavar="MODULE:SERVICE")
    parser.add_argument("--serve", action="append", default=[], metavar="MODULE:SERVICE=MODULE:FACTORY")
    options = parser.parse_args(args[:split])
    command = args[split + 1 :]
    if not command or command[0] != "server":
        raise SystemExit("the command after -- must be `server ...`")
    # The hub is this tool's subject, not a dependency of otterscale-testing. The services are
    # checked here (a typo fails at once) and handed over by name: the hub runs inside Envoy.
    from otterscale.hub import main as hub_main
    from otterscale.hub._services import hub_service, routed_service

    try:
        for spec in options.route:
            routed_service(spec)
        for spec in options.serve:
            hub_service(spec)
    except (ValueError, ImportError) as exc:
        raise SystemExit(f"otterscale.testing._launcher: {exc}") from None
    return hub_main(command[1:], extra_routed_services=options.route, extra_hub_services=options.serve)


if __name__ == "__main__":
    sys.exit(main())
