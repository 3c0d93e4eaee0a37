"""Where the agent's own Kubernetes credentials come from, and nothing else.

Order (the same as kubectl's): the ``--kubeconfig`` flag, then ``$KUBECONFIG`` (a
``:``-separated list, merged), then ``~/.kube/config`` if it exists, then the in-cluster service
account (``KUBERNETES_SERVICE_HOST``/``_PORT`` plus the mounted token and CA). Parsing is
delegated to ``kubernetes.aio.config`` (certificate data, exec plugins, OIDC, token files); the
result is turned into a :class:`KubeConnection` for the agent's own aiohttp client, so no
``kubernetes`` global default configuration is ever set or read.

Never logs a token, a client key or a password.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from kubernetes.aio.client import Configuration
from kubernetes.aio.config import ConfigException, load_kube_config, refresh_token
from kubernetes.aio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)

logger = logging.getLogger(__name__)

__all__ = ["KubeConfigError", "KubeConnection", "load_connection"]


class KubeConfigError(Exception):
    """No usable Kubernetes credentials were found (the message says where the agent looked)."""


@dataclasses.dataclass(frozen=True)
class KubeConnection:
    """How to reach and authenticate to one kube-apiserver as the agent itself."""

    #: Base URL without a trailing slash, e.g. ``https://10.96.0.1:443``.
    server: str
    #: TLS settings (CA, client certificate); None for a plain-http server.
    ssl_context: ssl.SSLContext | None
    #: Returns the ``Authorization`` header value (refreshing rotated tokens), or None.
    authorization: Callable[[], Awaitable[str | None]]
    #: Where the credentials came from, for logs ("kubeconfig /x (context y)", "in-cluster").
    source: str
    tls_server_name: str | None = None
    proxy: str | None = None
    #: Long-running credential refresh (exec plugins, GCP); run it as a background task.
    refresher: Callable[[], Coroutine[Any, Any, None]] | None = None


def _new_configuration() -> Any:
    # type.__call__ skips the kubernetes metaclass that would copy (and could later be replaced
    # by) the process-wide default configuration.
    return type.__call__(Configuration)


async def load_connection(
    kubeconfig: str | os.PathLike[str] | None,
    environ: Mapping[str, str],
    *,
    home: Path | None = None,
    in_cluster_token: str = SERVICE_TOKEN_FILENAME,
    in_cluster_ca: str = SERVICE_CERT_FILENAME,
) -> KubeConnection:
    """Load the agent's credentials following the documented order; KubeConfigError if none."""
    candidates: str | None = None
    origin = ""
    if kubeconfig:
        candidates, origin = str(kubeconfig), "--kubeconfig"
    elif environ.get("KUBECONFIG"):
        candidates, origin = environ["KUBECONFIG"], "KUBECONFIG"
    else:
        default = (home or Path.home()) / ".kube" / "config"
        if default.is_file():
            candidates, origin = str(default), "~/.kube/config"

    if candidates is not None:
        paths = [p for p in candidates.split(os.pathsep) if p]
        if not any(Path(p).expanduser().is_file() for p in paths):
            raise KubeConfigError(f"kubeconfig from {origin} not found: {candidates}")
        return await _from_kubeconfig(candidates, origin)
    try:
        return _in_cluster(environ, in_cluster_token, in_cluster_ca)
    except ConfigException as exc:
        raise KubeConfigError(
            "no Kubernetes credentials: pass --kubeconfig, set KUBECONFIG, create ~/.kube/config, "
            f"or run in a pod with a service account ({exc})"
        ) from exc


async def _from_kubeconfig(paths: str, origin: str) -> KubeConnection:
    cfg = _new_configuration()
    try:
        loader = await load_kube_config(config_file=paths, client_configuration=cfg, persist_config=False)
    except (ConfigException, OSError, ValueError, KeyError) as exc:
        raise KubeConfigError(f"kubeconfig from {origin} ({paths}) is not usable: {exc}") from exc
    context = (loader.current_context or {}).get("name", "?")

    async def refresh() -> None:
        # Returns at once unless the user authenticates through an exec plugin or GCP, whose
        # short-lived tokens it renews every minute.
        await refresh_token(loader, cfg)

    return _connection(cfg, f"kubeconfig {paths} (context {context}, from {origin})", refresh)


def _in_cluster(environ: Mapping[str, str], token_file: str, ca_file: str) -> KubeConnection:
    cfg = _new_configuration()
    # The library's loader re-reads the (rotating) token file through refresh_api_key_hook.
    InClusterConfigLoader(token_filename=token_file, cert_filename=ca_file, environ=environ).load_and_set(cfg)
    return _connection(cfg, "in-cluster service account", None)


def _connection(
    cfg: Any, source: str, refresher: Callable[[], Coroutine[Any, Any, None]] | None
) -> KubeConnection:
    server = str(cfg.host).rstrip("/")
    ssl_context: ssl.SSLContext | None = None
    if server.startswith("https://"):
        ssl_context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
        if cfg.cert_file:
            ssl_context.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file)
        if not cfg.verify_ssl:
            logger.warning("TLS verification of %s is disabled by the kubeconfig", server)
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE

    async def authorization() -> str | None:
        value = await cfg.get_api_key_with_prefix("BearerToken")
        return str(value) if value else None

    return KubeConnection(
        server=server,
        ssl_context=ssl_context,
        authorization=authorization,
        source=source,
        tls_server_name=cfg.tls_server_name or None,
        proxy=cfg.proxy or None,
        refresher=refresher,
    )
