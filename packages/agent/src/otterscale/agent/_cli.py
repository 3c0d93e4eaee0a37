"""``otterscale agent`` (also installed as ``otterscale-agent``): flags, config, signals, exit status.

The only module of the agent that reads the process environment (``OTTERSCALE_CONTAINER`` through
common's ``resolve_defaults``, ``KUBECONFIG`` and the in-cluster service variables), which it
passes down explicitly. Signal handlers only set the stop event; a second signal aborts the
graceful shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Mapping, Sequence

from otterscale.common import (
    CONTAINER_CONFIG,
    CONTAINER_ENV,
    DEFAULT_ADDRESS,
    ConfigError,
    UsageError,
    add_common_arguments,
    configure_logging,
    derive_identity_key,
    load_config,
    resolve_defaults,
)

from ._agent import AgentSettings, run_agent
from ._discovery import DEFAULT_TTL
from ._kubeconfig import KubeConfigError

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Run the OtterScale agent for one cluster: serve otterscale.resource.v1.ResourceService to the
hub and execute every call in the cluster as the calling user (Kubernetes impersonation).
"""

_EPILOG = f"""\
Kubernetes credentials, first found wins:
  --kubeconfig PATH, then $KUBECONFIG, then ~/.kube/config, then the in-cluster service account.
  The agent's own identity needs: impersonate users and groups, plus get on discovery and
  /openapi/v3 (Discovery and Schema use it); everything else runs with the caller's rights.

Listening:
  --address {DEFAULT_ADDRESS} listens on all interfaces; a port of 0 means the cluster's
  clusters.<NAME>.agent.api_port from the configuration. HTTP/1.1 and h2c on one port:
  Connect, gRPC and gRPC-Web. GET /ping answers 204.

Security:
  Every call must carry the hub's identity signature, keyed from clusters.<NAME>.agent.auth.pass;
  anything else is refused with unauthenticated. Do not expose this port to users.

Container mode ({CONTAINER_ENV}=true): --address defaults to {DEFAULT_ADDRESS} and --config to
{CONTAINER_CONFIG}.

Discovery and OpenAPI are cached for {DEFAULT_TTL:g}s: a new CRD shows up in Discovery within that.
SIGTERM or SIGINT stops gracefully (open Watch streams end with unavailable); a second one aborts.
"""


def build_parser() -> argparse.ArgumentParser:
    """The agent's argument parser (``otterscale agent --help``)."""
    parser = argparse.ArgumentParser(
        prog="otterscale agent",
        description=_DESCRIPTION,
        epilog=textwrap.dedent(_EPILOG),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cluster",
        required=True,
        metavar="NAME",
        help="the cluster this agent serves: selects clusters.NAME in the configuration (required)",
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--kubeconfig",
        metavar="PATH",
        default=None,
        help="kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, then in-cluster)",
    )
    return parser


def settings_from_args(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[AgentSettings, str, str]:
    """Parse flags and the configuration into settings; also returns log level and format.

    Raises UsageError or ConfigError with a message for the operator.
    """
    args = build_parser().parse_args(list(argv))
    options = resolve_defaults(args, environ)
    config = load_config(options.config, require_tunnel_key=False)
    cluster = config.clusters.get(args.cluster)
    if cluster is None:
        known = ", ".join(sorted(config.clusters)) or "none"
        raise ConfigError(
            str(options.config),
            [(f"clusters.{args.cluster}", f"no such cluster (configured: {known}); check --cluster")],
        )
    password = cluster.agent.auth.password.get_secret_value()
    settings = AgentSettings(
        cluster=args.cluster,
        host=options.host,
        port=options.port or cluster.agent.api_port,
        identity_key=derive_identity_key(args.cluster, password),
        kubeconfig=args.kubeconfig,
        environ=dict(environ),
    )
    return settings, options.log_level, options.log_format


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``otterscale agent`` and of the ``otterscale-agent`` script."""
    environ = dict(os.environ)
    try:
        settings, level, fmt = settings_from_args(sys.argv[1:] if argv is None else argv, environ)
    except ConfigError as exc:
        sys.stderr.write(f"otterscale agent: {exc}\n")
        return 1
    except UsageError as exc:
        sys.stderr.write(f"otterscale agent: error: {exc}\n")
        return 2
    configure_logging(level, fmt)
    try:
        return asyncio.run(_serve(settings))
    except KubeConfigError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


async def _serve(settings: AgentSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: aborting the graceful shutdown", signal.Signals(signum).name)
            if main_task is not None:
                main_task.cancel()
            return
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        # Tunnel (chisel client) supervision is issue 4: it will be passed as a root task here.
        return await run_agent(settings, stop)
    except asyncio.CancelledError:
        return 130
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
