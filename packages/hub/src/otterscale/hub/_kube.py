"""The hub's own Kubernetes API access: credentials, and a list+watch of one object as raw JSON.

Only leader election uses it (the Lease, the replicas' Pods): a hub without ``--leader-elect``
never loads credentials nor calls Kubernetes.

Credentials, first found wins (the order of kubectl and of the agent): ``--kubeconfig``, then
``$KUBECONFIG``, then ``~/.kube/config``, then the in-cluster service account. Parsing is
``kubernetes.aio.config``'s, loaded into a fresh ``Configuration`` of our own: the library's
process-wide default configuration is never set or read (its ``Watch`` helper builds an
``ApiClient()`` from that default, one reason :func:`follow_object` does not use it).

:func:`follow_object` keeps one named object fresh the way informers do, avoiding the asyncio
client's watch traps (architecture.md): it lists by ``metadata.name`` field selector (an RBAC
``resourceNames`` rule allows that), then watches from the list's resourceVersion with bookmarks
and a server-side timeout, and lists again after a 410 Gone, an error, or a connection that goes
quiet for longer than ``idle_timeout``. Events are decoded as plain JSON (no typed models).

Never logs a token or a client key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes.aio.client import ApiClient, ApiException, Configuration
from kubernetes.aio.config import ConfigException, load_kube_config
from kubernetes.aio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)

from ._errors import HubError

logger = logging.getLogger(__name__)

#: The namespace file of the in-cluster service account.
#: Bound on every single (non-watch) API call of the hub.
CALL_TIMEOUT = 5.0

#: ``list_namespaced_<kind>_without_preload_content`` of the generated API.
RawList = Callable[..., Awaitable[aiohttp.ClientResponse]]


class KubernetesConfigError(HubError):
    """No usable Kubernetes credentials (the message says where the hub looked)."""


async def open_api_client(kubeconfig: str | None, environ: Mapping[str, str]) -> tuple[ApiClient, str]:
    """An ``ApiClient`` with the hub's credentials and a description of where they came from."""
    configuration = type.__call__(Configuration)  # skip the metaclass: no process-wide default
    candidates, origin = None, ""
    if kubeconfig:
        candidates, origin = kubeconfig, "--kubeconfig"
    elif environ.get("KUBECONFIG"):
        candidates, origin = environ["KUBECONFIG"], "KUBECONFIG"
    else:
        default = Path(environ.get("HOME") or Path.home()) / ".kube" / "config"
        if default.is_file():
            candidates, origin = str(default), "~/.kube/config"
    if candidates is not None:
        paths = [path for path in candidates.split(os.pathsep) if path]
        if not any(Path(path).expanduser().is_file() for path in paths):
            raise KubernetesConfigError(f"kubeconfig from {origin} not found: {candidates}")
        try:
            loader = await load_kube_config(
                config_file=candidates, client_configuration=configuration, persist_config=False
            )
        except (ConfigException, OSError, ValueError, KeyError) as exc:
            raise KubernetesConfigError(
                f"kubeconfig from {origin} ({candidates}) is not usable: {exc}"
            ) from exc
        context = (loader.current_context or {}).get("name", "?")
        source = f"kubeconfig {candidates} (context {context}, from {origin})"
    else:
        try:
            InClusterConfigLoader(
                token_filename=SERVICE_TOKEN_FILENAME, cert_filename=SERVICE_CERT_FILENAME, environ=environ
            ).load_and_set(configuration)
        except ConfigException as exc:
            raise KubernetesConfigError(
                "leader election needs the Kubernetes API: run in a Pod with a service account, or pass "
                f"--kubeconfig (or set KUBECONFIG) ({exc})"
            ) from exc
        source = "in-cluster service account"
    return ApiClient(configuration), source


def status_text(exc: BaseException) -> str:
    """A short reason for a failed API call (the Status message when there is one)."""
    if isinstance(exc, ApiException):
        message = ""
        if exc.body:
            try:
                message = str(json.loads(exc.body).get("message", ""))
            except (ValueError, AttributeError):
                message = ""
        return f"HTTP {exc.status}: {message or exc.reason}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Relist(Exception):
    """The watch cannot continue from its resourceVersion (410 Gone): list again."""


async def follow_object(
    list_raw: RawList,
    namespace: str,
    name: str,
    on_change: Callable[[dict[str, Any] | None], None],
    *,
    what: str,
    watch_seconds: int = 240,
    idle_timeout: float | None = None,
    backoff_max: float = 5.0,
) -> None:
    """Call ``on_change(object or None)`` with the current state of ``name``, then on every change.

    Runs until cancelled. ``on_change`` also gets the state after every re-list (even an
    unchanged one: callers compare ``metadata.resourceVersion``). ``what`` names the object in
    logs. See the module docstring.
    """
    selector = f"metadata.name={name}"
    delay = 0.25
    failing = False
    while True:
        try:
            response = await list_raw(namespace, field_selector=selector, _request_timeout=CALL_TIMEOUT)
            body = await _read_json(response)
            items = body.get("items") or []
            version = str(body.get("metadata", {}).get("resourceVersion", ""))
            on_change(items[0] if items else None)
            if failing:
                logger.info("watching %s again", what)
                failing = False
            delay = 0.25
            while True:
                version = await _watch_once(
                    list_raw,
                    namespace,
                    selector,
                    version,
                    on_change,
                    seconds=watch_seconds + random.randint(0, 30),  # noqa: S311 - spread, not secrecy
                    idle_timeout=idle_timeout,
                )
        except asyncio.CancelledError:
            raise
        except _Relist:
            continue
        except (ApiException, aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            level = logging.DEBUG if failing else logging.WARNING
            logger.log(level, "cannot watch %s (retrying in %.1fs): %s", what, delay, status_text(exc))
            failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_max)


async def _watch_once(
    list_raw: RawList,
    namespace: str,
    selector: str,
    version: str,
    on_change: Callable[[dict[str, Any] | None], None],
    *,
    seconds: int,
    idle_timeout: float | None,
) -> str:
    """One watch request from ``version``; returns the last resourceVersion seen."""
    response = await list_raw(
        namespace,
        field_selector=selector,
        watch=True,
        resource_version=version,
        allow_watch_bookmarks=True,
        timeout_seconds=seconds,
        _request_timeout=float(seconds + 30),
    )
    try:
        if response.status != 200:
            await _read_json(response)  # raises with the Status
        while True:
            if idle_timeout is None:
                line = await response.content.readline()
            else:
                async with asyncio.timeout(idle_timeout):  # not wait_for: see _election.acquire
                    line = await response.content.readline()
            if not line:
                return version  # the server ended the watch (timeout_seconds): watch again
            if not line.strip():
                continue
            event = json.loads(line)
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Relist
                raise ValueError(f"watch error: {obj.get('message') or obj}")
            version = str(obj.get("metadata", {}).get("resourceVersion", version))
            if kind in ("ADDED", "MODIFIED"):
                on_change(obj)
            elif kind == "DELETED":
                on_change(None)
    finally:
        response.release()


async def _read_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data = await response.read()
    finally:
        response.release()
    if response.status != 200:
        if response.status == 410:
            raise _Relist
        raise ApiException(status=response.status, reason=response.reason, body=data.decode(errors="replace"))
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("the API server answered with something other than a JSON object")
    return document
