"""What every ``otterscale`` client command shares: the hub, the token, the cluster, the client.

Settings come from flags, else from the environment (read here and nowhere else in the
distribution): ``OTTERSCALE_HUB`` (the hub's URL), ``OTTERSCALE_TOKEN_FILE`` (a file holding an
OIDC access token, read again for every call, so a token refreshed in place keeps working) or
``OTTERSCALE_TOKEN`` (the token itself), ``OTTERSCALE_CLUSTER`` and ``OTTERSCALE_CA_FILE``. The
token is sent as ``Authorization: Bearer`` and never printed, logged or put in an error message.

Errors of a call are printed as ``otterscale <command>: <code>: <message>`` (exit status 1);
usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from connectrpc.client import ConnectClient
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import UsageError
from otterscale.runtime.v1.runtime_connect import RuntimeServiceClient

logger = logging.getLogger(__name__)

__all__ = [
    "ClientOptions",
    "add_client_arguments",
    "client_options",
    "open_client",
    "open_service",
    "run_command",
]


#: A generated client class of one of the hub's services.
_C = TypeVar("_C", bound=ConnectClient)

_PROTOCOLS = {"connect": ProtocolType.CONNECT, "grpc": ProtocolType.GRPC, "grpc-web": ProtocolType.GRPC_WEB}


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """Where and as whom a command calls (tokens are read when a call is made).

    ``cluster`` is empty for the fleet commands, whose cluster selection is their own.
    """

    hub: str
    cluster: str
    namespace: str
    protocol: str
    http2: bool
    token: str | None = dataclasses.field(default=None, repr=False)
    token_file: Path | None = None
    ca_file: Path | None = None

    def bearer(self) -> str:
        """The current token (the file is read again each time)."""
        if self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise UsageError(
                    f"cannot read the token file {self.token_file}: {exc.strerror or exc}"
                ) from None
            if not token:
                raise UsageError(f"the token file {self.token_file} is empty")
            return token
        assert self.token is not None
        return self.token


def add_client_arguments(
    parser: argparse.ArgumentParser, *, namespaced: bool = True, one_cluster: bool = True
) -> None:
    """``--hub``, ``--token-file``, ``--cluster``, ``-n``, ``--protocol``, ``--http2``, ``--ca-file``.

    Without ``one_cluster`` there is no ``--cluster`` here: the command selects clusters itself
    (and ``OTTERSCALE_CLUSTER`` is not read).
    """
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--hub", metavar="URL", help="the hub, e.g. https://otterscale.example.com ($OTTERSCALE_HUB)"
    )
    if one_cluster:
        group.add_argument("--cluster", metavar="NAME", help="the cluster ($OTTERSCALE_CLUSTER)")
    if namespaced:
        group.add_argument("-n", "--namespace", default="default", help="the namespace (default: default)")
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help="a file holding an OIDC access token, read for every call ($OTTERSCALE_TOKEN_FILE; "
        "or the token itself in $OTTERSCALE_TOKEN)",
    )
    group.add_argument(
        "--protocol", choices=sorted(_PROTOCOLS), default="connect", help="wire protocol (default: connect)"
    )
    group.add_argument(
        "--http2",
        action="store_true",
        help="use HTTP/2 (over plain http: prior knowledge, which the hub speaks); gRPC always does. "
        "exec and port-forward then use one bidirectional stream per session",
    )
    group.add_argument(
        "--ca-file", metavar="PATH", help="CA bundle to verify the hub's certificate ($OTTERSCALE_CA_FILE)"
    )


def client_options(args: argparse.Namespace, environ: Mapping[str, str]) -> ClientOptions:
    """Flags over environment; UsageError naming what is missing."""
    hub = args.hub or environ.get("OTTERSCALE_HUB", "")
    if not hub:
        raise UsageError("no hub: pass --hub URL or set OTTERSCALE_HUB")
    parts = urlsplit(hub)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--hub must be an http(s) URL, e.g. https://otterscale.example.com, not {hub!r}")
    cluster = ""
    if hasattr(args, "cluster"):  # a one-cluster command (see add_client_arguments)
        cluster = args.cluster or environ.get("OTTERSCALE_CLUSTER", "")
        if not cluster:
            raise UsageError("no cluster: pass --cluster NAME or set OTTERSCALE_CLUSTER")
    token_file = args.token_file or environ.get("OTTERSCALE_TOKEN_FILE")
    token = None if token_file else (environ.get("OTTERSCALE_TOKEN") or None)
    if not token_file and not token:
        raise UsageError("no token: pass --token-file PATH or set OTTERSCALE_TOKEN_FILE or OTTERSCALE_TOKEN")
    ca_file = args.ca_file or environ.get("OTTERSCALE_CA_FILE")
    return ClientOptions(
        hub=hub.rstrip("/"),
        cluster=cluster,
        namespace=getattr(args, "namespace", "") or "",
        protocol=args.protocol,
        http2=args.http2 or args.protocol == "grpc",
        token=token,
        token_file=Path(token_file) if token_file else None,
        ca_file=Path(ca_file) if ca_file else None,
    )


class _Bearer:
    """Adds the caller's token to every call (a connectrpc metadata interceptor)."""

    def __init__(self, options: ClientOptions) -> None:
        self._options = options

    async def on_start(self, ctx: Any) -> None:
        ctx.request_headers["authorization"] = f"Bearer {self._options.bearer()}"

    async def on_end(self, token: Any, ctx: Any, error: Exception | None) -> None:
        return None


def open_client(options: ClientOptions) -> contextlib.AbstractAsyncContextManager[RuntimeServiceClient]:
    """A RuntimeService client of the hub; closed (with its HTTP transport) on exit."""
    return open_service(options, RuntimeServiceClient)


@contextlib.asynccontextmanager
async def open_service(options: ClientOptions, service: type[_C]) -> AsyncIterator[_C]:
    """A client of the hub's ``service`` (a generated client class); closed (with its HTTP
    transport) on exit."""
    ca = options.ca_file.read_bytes() if options.ca_file is not None else None
    transport = HTTPTransport(
        http_version=HTTPVersion.HTTP2 if options.http2 else None,
        tls_ca_cert=ca,
        tls_include_system_certs=ca is None,
        read_timeout=None,
    )
    client = service(
        options.hub,
        protocol=_PROTOCOLS[options.protocol],
        http_client=Client(transport),
        interceptors=[_Bearer(options)],
        send_compression=None,  # keystrokes, port-forward bytes, small fan-out requests
    )
    try:
        yield client
    finally:
        await client.close()
        await transport.aclose()


def run_command(
    name: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    body: Callable[[argparse.Namespace, ClientOptions], Coroutine[Any, Any, int]],
    environ: Mapping[str, str] | None = None,
    *,
    command_after_dashes: bool = False,
) -> int:
    """Parse, resolve the options, run ``body``; turn failures into messages and exit statuses.

    With ``command_after_dashes`` everything after the first ``--`` is ``args.command`` (the
    options before it may come in any order, as with kubectl).
    """
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if command_after_dashes and "--" in words:
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if command_after_dashes:
        args.command = command

    async def guarded(options: ClientOptions) -> int:
        # Errors are reported here, inside the loop, and the garbage they leave (an error's
        # traceback holds the HTTP client's Rust objects in reference cycles) is collected before
        # the loop ends: freed at interpreter exit instead, they abort the process (SIGABRT)
        # rather than letting it exit with the status.
        try:
            return await body(args, options)
        except UsageError as exc:
            sys.stderr.write(f"otterscale {name}: error: {exc}\n")
            return 2
        except ConnectError as exc:
            sys.stderr.write(f"otterscale {name}: {exc.code.value}: {exc.message}\n")
            return 1
        finally:
            gc.collect()

    try:
        options = client_options(args, os.environ if environ is None else environ)
        options.bearer()  # fail now, not on the first call, when the token cannot be read
        return asyncio.run(guarded(options))
    except UsageError as exc:
        sys.stderr.write(f"otterscale {name}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
