"""``otterscale agent`` (also installed as ``otterscale-agent``): flags, config, exit status.

The agent runs inside Envoy (:func:`otterscale.common.serve`): :func:`main` parses the flags,
reads the port and the request deadline from the configuration, and starts Envoy with the agent
inside (``otterscale.agent._hosted``), which checks everything :func:`settings_from_args` checks
before it serves: a misconfigured agent exits at once with a message (status 1) instead of
serving a tunnel that can never come up (the cluster's fingerprint, the tunnel server URL, the
chisel binary and its version), printed here as before.

The only module of the agent that reads the process environment (``OTTERSCALE_CONTAINER`` through
common's ``resolve_defaults``, ``PATH`` to find chisel, ``KUBECONFIG`` and the in-cluster service
variables), which it passes down explicitly. The first SIGTERM or SIGINT stops gracefully (open
Watch streams end with unavailable, calls in flight finish); a second one stops at once.

The launcher imports only what :func:`main` needs (the flags and the few values Envoy is started
with), as the hub's does: the agent's own modules (the Kubernetes client, the configuration model,
the services) are imported inside Envoy, once, by :func:`settings_from_args` and ``_hosted``.
"""

from __future__ import annotations

import argparse
import asyncio.sslproto
import dataclasses
import logging
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from otterscale.common import (
    CONTAINER_CONFIG,
    CONTAINER_ENV,
    DEFAULT_ADDRESS,
    MIN_CHISEL_VERSION,
    Address,
    ChiselBinary,
    ConfigError,
    Launch,
    TunnelError,
    UsageError,
    add_common_arguments,
    check_chisel,
    configure_logging,
    configured_limits,
    configured_value,
    resolve_defaults,
    serve,
)

from ._defaults import DISCOVERY_TTL
from ._tunnel import (
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_RETRY_INTERVAL,
    FINGERPRINT_HINT,
    TunnelSettings,
    default_server_url,
)

if TYPE_CHECKING:
    from otterscale.common import ClusterConfig, OtterscaleConfig

    from ._agent import AgentSettings

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main"]

#: The agent inside Envoy.
APP = "otterscale.agent._hosted:app"
#: Seconds calls in flight may take to finish once a stop starts (Watches end at once).
GRACEFUL_TIMEOUT = 5.0
#: Seconds the agent's own shutdown may take once calls in flight are done (chisel, client).
STOP_TIMEOUT = 10.0

_MIN_CHISEL = ".".join(str(part) for part in MIN_CHISEL_VERSION)
# Stands in for the binary while the other tunnel settings are checked (before chisel is run).
_UNCHECKED_CHISEL = ChiselBinary(path=Path("chisel"), version=MIN_CHISEL_VERSION)

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
  Connect, gRPC and gRPC-Web.

Tunnel (how the hub reaches this agent; the agent dials out, no inbound port needed):
  The agent runs `chisel client` (--chisel; default: chisel on PATH, version {_MIN_CHISEL} or
  newer) against the hub's tunnel server (--tunnel-server-url; default
  http://<tunnel.server.host>:<tunnel.server.port> from the configuration, where a host of
  0.0.0.0, :: or "" means 127.0.0.1) and asks for the reverse remote
  R:127.0.0.1:<tunnel_port>:127.0.0.1:<the port this agent listens on>.
  clusters.<NAME>.agent.fingerprint is required: the agent trusts only the tunnel server with
  that key. To get it, start the hub and copy the fingerprint it logs at start-up (or run
  `otterscale server --config FILE --print-fingerprint` with the hub's configuration).
  The password reaches chisel in its environment (AUTH), never on its command line.
  Reconnects are at most {DEFAULT_MAX_RETRY_INTERVAL:g}s apart, so the agent is back within seconds of a hub
  restart or fail-over; keepalive {DEFAULT_KEEPALIVE:g}s. A chisel process that dies is restarted.
  --no-tunnel runs the agent alone, without chisel (tests, local debugging).

Probes (no signature needed):
  GET /ping answers 204 while the agent serves (liveness).
  GET /readyz answers 200 while the tunnel is connected (always with --no-tunnel), else 503
  with the reason (readiness).

Security:
  Every call must carry the hub's identity signature, keyed from clusters.<NAME>.agent.auth.pass;
  anything else is refused with unauthenticated. Do not expose this port to users.

Container mode ({CONTAINER_ENV}=true): --address defaults to {DEFAULT_ADDRESS} and --config to
{CONTAINER_CONFIG}.

Discovery and the OpenAPI index are cached for --discovery-ttl seconds (default {DISCOVERY_TTL:g}): a new
CRD shows up in Discovery within that.
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
    parser.add_argument(
        "--discovery-ttl",
        metavar="SECONDS",
        type=_positive_seconds,
        default=DISCOVERY_TTL,
        help=f"how long Discovery and the OpenAPI index are cached (default {DISCOVERY_TTL:g})",
    )
    tunnel = parser.add_argument_group("tunnel")
    tunnel.add_argument(
        "--chisel",
        metavar="PATH",
        default=None,
        help=f"the chisel binary, version {_MIN_CHISEL} or newer (default: chisel on PATH)",
    )
    tunnel.add_argument(
        "--tunnel-server-url",
        metavar="URL",
        default=None,
        help="the hub's tunnel server, e.g. http://hub-tunnel:8300 (default: "
        "http://tunnel.server.host:tunnel.server.port from the configuration, 0.0.0.0 read as 127.0.0.1)",
    )
    tunnel.add_argument(
        "--no-tunnel",
        action="store_true",
        help="run without the tunnel (no chisel; /readyz is always 200): tests and local debugging",
    )
    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def settings_from_args(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[AgentSettings, str, str]:
    """Parse flags and the configuration into settings; also returns log level and format.

    Raises UsageError, ConfigError or TunnelError (chisel missing or too old, bad tunnel
    settings) with a message for the operator. Called inside Envoy (``_hosted``), where the agent
    runs: the configuration model and the agent's modules are imported here, not by the launcher.
    """
    from otterscale.common import derive_identity_key, load_config  # pydantic, cryptography

    from ._agent import AgentSettings  # the whole agent: the Kubernetes client, the services

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
    port = options.port or cluster.agent.api_port
    tunnel: TunnelSettings | None = None
    check_flags(args)
    if not args.no_tunnel:
        tunnel = _tunnel_settings(args, options.config, config, cluster, port, environ)
    settings = AgentSettings(
        cluster=args.cluster,
        host=options.host,
        port=port,
        identity_key=derive_identity_key(args.cluster, password),
        kubeconfig=args.kubeconfig,
        environ=dict(environ),
        discovery_ttl=args.discovery_ttl,
        tunnel=tunnel,
        request_timeout=config.limits.request_timeout_seconds,
        runtime=config.runtime,
        audit=config.audit,
    )
    return settings, options.log_level, options.log_format


def check_flags(args: argparse.Namespace) -> None:
    """What the flags alone can get wrong (UsageError): checked before anything starts."""
    if args.no_tunnel:
        given = [
            flag
            for flag, value in (("--chisel", args.chisel), ("--tunnel-server-url", args.tunnel_server_url))
            if value
        ]
        if given:
            raise UsageError(f"--no-tunnel runs the agent without a tunnel; drop {' and '.join(given)}")
        return
    if args.tunnel_server_url is not None and not args.tunnel_server_url.strip():
        raise UsageError("--tunnel-server-url must not be empty")
    if args.chisel is not None and not str(args.chisel).strip():
        raise UsageError("--chisel must not be empty")


def _tunnel_settings(
    args: argparse.Namespace,
    source: Path,
    config: OtterscaleConfig,
    cluster: ClusterConfig,
    port: int,
    environ: Mapping[str, str],
) -> TunnelSettings:
    """The tunnel's settings, checked: fingerprint, URL, then the chisel binary (which is run).

    Raises ConfigError (no fingerprint), UsageError (bad --tunnel-server-url or --chisel) or
    TunnelError (chisel missing or too old, or a malformed fingerprint).
    """
    agent = cluster.agent
    if agent.fingerprint is None:
        raise ConfigError(
            str(source),
            [
                (
                    f"clusters.{args.cluster}.agent.fingerprint",
                    "required: the agent connects only to the tunnel server with this fingerprint "
                    f"(chisel would otherwise trust any server); {FINGERPRINT_HINT}",
                )
            ],
        )
    if args.tunnel_server_url is not None:
        url = args.tunnel_server_url.strip()
    else:
        url = default_server_url(config.tunnel.server.host, config.tunnel.server.port)
    placeholder = TunnelSettings(
        chisel=_UNCHECKED_CHISEL,
        server_url=url,
        fingerprint=agent.fingerprint.strip(),
        user=agent.auth.user,
        password=agent.auth.password.get_secret_value(),
        tunnel_port=agent.tunnel_port,
    )
    try:
        placeholder.check(port)
    except TunnelError as exc:
        raise TunnelError(f"tunnel settings of cluster {args.cluster}: {exc}") from exc
    binary = check_chisel(args.chisel, search_path=environ.get("PATH", os.defpath))
    return dataclasses.replace(placeholder, chisel=binary)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``otterscale agent`` and of the ``otterscale-agent`` script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(arguments)
        options = resolve_defaults(args, os.environ)
        check_flags(args)
    except UsageError as exc:
        sys.stderr.write(f"otterscale agent: error: {exc}\n")
        return 2
    log_format = options.log_format
    configure_logging(options.log_level, log_format)
    # Port 0 means the cluster's api_port: read it now (the agent checks the whole file inside).
    port = options.port or configured_value(options.config, "clusters", args.cluster, "agent", "api_port")
    launch = Launch(
        name="agent",
        command="otterscale agent",
        app=APP,
        api=Address(options.host, port if isinstance(port, int) and 0 < port < 65536 else 0),
        limits=configured_limits(options.config, hub=False),
        settings={"argv": arguments},
        drain_timeout=GRACEFUL_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
        log_level=options.log_level,
        log_format=log_format,
        loop=LOOP,
    )
    try:
        return serve(launch)
    except KeyboardInterrupt:
        return 130


#: The agent's event loop inside Envoy (pyvoy's ``loop``; why not uvloop: :func:`tune_tls_reads`).
LOOP = "asyncio"

#: asyncio's TLS read buffer per connection (CPython's default is 256 KiB).
TLS_READ_BUFFER = 64 * 1024


def tune_tls_reads() -> None:
    """asyncio's TLS read buffer: 64 KiB per connection instead of 256 KiB (the agent runs on
    asyncio's event loop inside Envoy: ``LOOP``).

    Every Watch and every exec, port-forward or log stream holds its own TLS connection to
    kube-apiserver, and asyncio's SSL transport preallocates its read buffer per connection
    (``asyncio.sslproto.SSLProtocol.max_size``): with 1,000 Watches that buffer alone was
    250 MiB. 64 KiB still holds several of the API server's TLS records; the transport reads in
    a loop, so throughput does not depend on it.

    Why not uvloop (which the agent used before for the same memory reason): uvloop 0.21-0.23
    discards the TLS data it holds for a connection whose reading is paused when the peer closes
    TCP without a TLS close_notify (MagicStack/uvloop#385's shutdown; the fix, #661, is not
    released). kube-apiserver ends exec, port-forward and log streams exactly that way, and
    reading pauses whenever the client is slower than the pod: 64 MiB forwarded through the hub
    arrived 30 to 190 KiB short in four runs of five on uvloop, complete every time on
    asyncio's loop. Losing the end of a command's output or a download is not a trade-off.
    """
    if hasattr(asyncio.sslproto.SSLProtocol, "max_size"):
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
