"""``otterscale server`` (and ``otterscale-hub``): run the hub until SIGTERM or SIGINT.

    otterscale server --address=:8299 --config=otterscale.yaml [--chisel PATH]
                      [--management-address=127.0.0.1:8298]
    otterscale server --config=otterscale.yaml --print-fingerprint
    otterscale server --config=otterscale.yaml --leader-elect      # several replicas (in Kubernetes)

The hub runs inside Envoy (:func:`otterscale.common.serve`): this command only parses its flags,
reads the few limits Envoy enforces itself, and starts Envoy with the hub inside
(``otterscale.hub._hosted``), which reads and checks ``otterscale.yaml``; a problem there is
printed here as before. It imports nothing heavy, so the hub starts fast.

With ``OTTERSCALE_CONTAINER=true`` the address defaults to ``:8299``, the configuration to
``/etc/app/otterscale.yaml`` and the log format to JSON. ``/metrics`` and the per-cluster health
are served on the management address only (default ``127.0.0.1:8298``; in a Pod, set it to
``:8298`` and keep that port out of the Service), the API's address serves the API and the overall
health. The first SIGTERM or SIGINT starts a graceful shutdown (stop being ready, end Watches,
finish calls in flight within --drain-timeout, stop chisel, release the Lease); a second one
stops at once (chisel is still stopped); a third kills Envoy.

Leader election is configured by flags and the Pod's environment only, not by
``otterscale.yaml``: that file is shared with every agent and describes the system, while
whether a hub campaigns (and for which Lease, as which Pod) is a property of how this hub is
deployed, which the Helm chart (or whoever runs it) knows and passes as arguments and the
downward API (``POD_NAME``, ``POD_NAMESPACE``), as kube components do with ``--leader-elect``.
This is the only module of the hub that reads the environment: ``POD_NAME`` (identity, and the
Pod to label), ``POD_NAMESPACE`` (the Lease's namespace; else the service account's),
``KUBECONFIG`` and ``HOME`` (credentials, when not in a Pod).

Exit status: 0 after a requested shutdown, 1 when the hub could not start or failed, 2 for bad
command-line input.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import secrets
import socket
import sys
from collections.abc import Mapping, Sequence

from otterscale.common import (
    Address,
    ConfigError,
    Launch,
    OtterscaleError,
    UsageError,
    add_common_arguments,
    configure_logging,
    configured_limits,
    parse_address,
    resolve_defaults,
    serve,
)

from ._lease import (
    DEFAULT_LEADER_LABEL,
    DEFAULT_LEASE_DURATION,
    DEFAULT_LEASE_NAME,
    DEFAULT_RENEW_DEADLINE,
    DEFAULT_RETRY_PERIOD,
    ElectionSettings,
    service_account_namespace,
)

logger = logging.getLogger(__name__)

PROG = "otterscale server"
#: Where ``/metrics`` and the per-cluster health are served unless ``--management-address`` says.
DEFAULT_MANAGEMENT_ADDRESS = "127.0.0.1:8298"
#: The hub inside Envoy.
APP = "otterscale.hub._hosted:app"
#: Seconds the hub's own shutdown may take once calls in flight are done (chisel, Lease).
STOP_TIMEOUT = 15.0


def hub_version() -> str:
    """The installed otterscale-hub version."""
    try:
        return importlib.metadata.version("otterscale-hub")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of the hub."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the OtterScale hub: the authenticated ResourceService API in front of every "
        "cluster's agent, with the embedded chisel tunnel server the agents connect to.",
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--chisel",
        metavar="PATH",
        default=None,
        help="the chisel binary (>= 1.11.5; default: chisel on PATH)",
    )
    parser.add_argument(
        "--management-address",
        metavar="[HOST]:PORT",
        default=DEFAULT_MANAGEMENT_ADDRESS,
        help="where /metrics, /readyz and the per-cluster health are served (default "
        f"{DEFAULT_MANAGEMENT_ADDRESS}; :8298 for every interface, e.g. in a Pod)",
    )
    parser.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=10.0,
        help="on shutdown, how long calls in flight may take to finish (default 10)",
    )
    parser.add_argument(
        "--print-fingerprint",
        action="store_true",
        help="print the tunnel fingerprint for the configured key (what agents put in "
        "clusters.<name>.agent.fingerprint) and exit",
    )
    election = parser.add_argument_group(
        "leader election",
        "Several replicas: the one holding the Lease (the leader) runs the tunnel server and labels "
        "its Pod; the others forward every call to it at <its Pod IP>:<the --address port>. The "
        "replica's identity is POD_NAME (else the host name plus a random suffix), the Lease lives "
        "in POD_NAMESPACE (else the service account's namespace).",
    )
    election.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="campaign for the Lease (needs the Kubernetes API and a fixed --address port; default off)",
    )
    election.add_argument(
        "--leader-elect-lease-name",
        metavar="NAME",
        default=DEFAULT_LEASE_NAME,
        help=f"the Lease (default {DEFAULT_LEASE_NAME})",
    )
    election.add_argument(
        "--leader-elect-namespace",
        metavar="NAMESPACE",
        default=None,
        help="the Lease's namespace (default: POD_NAMESPACE, else the service account's namespace)",
    )
    election.add_argument(
        "--leader-elect-lease-duration",
        metavar="SECONDS",
        type=_positive_float,
        default=DEFAULT_LEASE_DURATION,
        help=f"how long a Lease that is not renewed keeps others out (default {DEFAULT_LEASE_DURATION:g})",
    )
    election.add_argument(
        "--leader-elect-renew-deadline",
        metavar="SECONDS",
        type=_positive_float,
        default=DEFAULT_RENEW_DEADLINE,
        help="how long the leader keeps trying to renew before it steps down "
        f"(default {DEFAULT_RENEW_DEADLINE:g})",
    )
    election.add_argument(
        "--leader-elect-retry-period",
        metavar="SECONDS",
        type=_positive_float,
        default=DEFAULT_RETRY_PERIOD,
        help=f"between attempts to acquire or renew (default {DEFAULT_RETRY_PERIOD:g}, at least 1)",
    )
    election.add_argument(
        "--leader-label",
        metavar="KEY",
        default=DEFAULT_LEADER_LABEL,
        help=f'the Pod label the leader sets to "true" on its own Pod (default {DEFAULT_LEADER_LABEL})',
    )
    election.add_argument(
        "--kubeconfig",
        metavar="PATH",
        default=None,
        help="Kubernetes credentials (default: $KUBECONFIG, ~/.kube/config, then the in-cluster service "
        "account)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {hub_version()}")
    return parser


def election_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> ElectionSettings | None:
    """Leader election settings from the flags and the Pod's environment (None: not asked for)."""
    if not args.leader_elect:
        return None
    namespace = (
        args.leader_elect_namespace
        or environ.get("POD_NAMESPACE", "").strip()
        or service_account_namespace()
        or ""
    )
    if not namespace:
        raise UsageError(
            "--leader-elect needs the Lease's namespace: set POD_NAMESPACE (the downward API's "
            "metadata.namespace) or --leader-elect-namespace"
        )
    pod_name = environ.get("POD_NAME", "").strip() or None
    identity = pod_name or f"{socket.gethostname()}_{secrets.token_hex(4)}"
    settings = ElectionSettings(
        namespace=namespace,
        identity=identity,
        pod_name=pod_name,
        lease_name=args.leader_elect_lease_name,
        leader_label=args.leader_label,
        lease_duration=args.leader_elect_lease_duration,
        renew_deadline=args.leader_elect_renew_deadline,
        retry_period=args.leader_elect_retry_period,
        kubeconfig=args.kubeconfig,
        environ=environ,
    )
    problems = settings.problems()
    if problems:
        raise UsageError("leader election: " + "; ".join(problems))
    return settings


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a number") from None
    if not value > 0:
        raise UsageError("must be greater than 0")
    return value


def main(
    argv: Sequence[str] | None = None,
    *,
    extra_routed_services: Sequence[str] = (),
    extra_hub_services: Sequence[str] = (),
) -> int:
    """Entry point of ``otterscale server`` and ``otterscale-hub``; returns the exit status.

    ``extra_routed_services`` (``MODULE:SERVICE``, forwarded to the agents by cluster) and
    ``extra_hub_services`` (``MODULE:SERVICE=MODULE:FACTORY``, answered by the hub) are served
    besides the registry's (``_services``): how tests run a hub process that knows a test-only
    service (``otterscale.testing``'s launcher), exactly as a build of the hub with more services
    would. They travel to the hub inside Envoy by name (:func:`._services.routed_service`,
    :func:`._services.hub_service` resolve them there).
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        options = resolve_defaults(args)
        log_format = args.log_format or ("json" if options.container else "text")
        if args.print_fingerprint:
            return _print_fingerprint(options.config, args.chisel, options.log_level, log_format)
        election = election_settings(args, os.environ)
        if election is not None and options.port == 0:
            raise UsageError(
                "--leader-elect needs a fixed --address port (followers forward to the leader's)"
            )
        management = Address(*parse_address(args.management_address))
        configure_logging(options.log_level, log_format)
        launch = Launch(
            name="hub",
            command=PROG,
            app=APP,
            api=Address(options.host, options.port),
            management=management,
            limits=configured_limits(options.config, hub=True),
            settings={
                "config": str(options.config),
                "chisel": args.chisel,
                "election": _election_json(election),
                "routed_services": list(extra_routed_services),
                "hub_services": list(extra_hub_services),
            },
            drain_timeout=args.drain_timeout,
            stop_timeout=STOP_TIMEOUT,
            log_level=options.log_level,
            log_format=log_format,
        )
        return serve(launch)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


def _election_json(election: ElectionSettings | None) -> dict[str, object] | None:
    """The election settings as the hub inside Envoy gets them (it has the same environment)."""
    if election is None:
        return None
    fields = dataclasses.asdict(election)
    fields.pop("environ")
    return fields


def _print_fingerprint(config_path: os.PathLike[str], chisel: str | None, level: str, fmt: str) -> int:
    """``--print-fingerprint``: load the configuration and ask chisel (no Envoy, no serving)."""
    import asyncio

    from otterscale.common import load_config

    from ._tunnel_server import tunnel_fingerprint

    try:
        configure_logging(level, fmt)
        config = load_config(config_path)
        print(asyncio.run(tunnel_fingerprint(config, chisel=chisel)))
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    except OtterscaleError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    return 0


def console_main() -> None:
    """The ``otterscale-hub`` console script."""
    sys.exit(main())
