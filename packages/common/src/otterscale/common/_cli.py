"""The ``otterscale`` command, and the flags and defaults every service command shares.

``otterscale`` lives in otterscale-common and knows no service: each service distribution
registers its subcommand in the entry-point group ``otterscale.commands``, e.g. in the hub's
``pyproject.toml``::

    [project.entry-points."otterscale.commands"]
    server = "otterscale.hub._cli:main"

The target is called with the remaining arguments, ``target(argv: list[str]) -> int | None``, and
its result is the exit status (None = 0). It may raise :class:`ConfigError` (printed, status 1) or
:class:`UsageError` (printed, status 2). ``otterscale --help`` lists the installed commands; a
known but missing one names the distribution to install.

This is the only module of otterscale-common that reads environment variables
(``OTTERSCALE_CONTAINER``); everything else gets its settings passed in.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import ipaddress
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ._errors import ConfigError, UsageError
from ._logging import LOG_FORMATS, LOG_LEVELS

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "otterscale.commands"
CONTAINER_ENV = "OTTERSCALE_CONTAINER"
DEFAULT_ADDRESS = ":8299"
DEFAULT_CONFIG = "otterscale.yaml"
CONTAINER_CONFIG = "/etc/app/otterscale.yaml"

#: Commands the project ships, and the distribution that provides each.
KNOWN_COMMANDS: Mapping[str, str] = {
    "server": "otterscale-hub",
    "agent": "otterscale-agent",
    **dict.fromkeys(("logs", "exec", "port-forward", "scale", "restart", "fleet"), "otterscale-cli"),
}

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"", "false", "0", "no", "off"})
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")

CommandMain = Callable[[list[str]], int | None]


@dataclass(frozen=True, slots=True)
class CommonOptions:
    """The shared flags after defaults are applied: where to listen, what to read, how to log.

    ``host`` is ``""`` for "all interfaces" (``--address=:8299``).
    """

    address: str
    host: str
    port: int
    config: Path
    log_level: str
    log_format: str
    container: bool


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--address``, ``--config``, ``--log-level`` and ``--log-format`` to a service's parser.

    They default to None so :func:`resolve_defaults` can tell an explicit flag (which always wins)
    from an absent one (which gets the normal or the container-mode default).
    """
    parser.add_argument(
        "--address",
        metavar="[HOST]:PORT",
        default=None,
        help=f"listen address, e.g. :8299, 127.0.0.1:8299 or [::1]:8299 (default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"configuration file (default {DEFAULT_CONFIG}; {CONTAINER_CONFIG} when {CONTAINER_ENV}=true)",
    )
    parser.add_argument(
        "--log-level", type=str.lower, choices=LOG_LEVELS, default=None, help="log level (default info)"
    )
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None, help="log format (default text)")


def container_mode(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``OTTERSCALE_CONTAINER`` asks for container defaults (true/1/yes/on)."""
    env = os.environ if environ is None else environ
    value = env.get(CONTAINER_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{CONTAINER_ENV} must be true or false, not {env[CONTAINER_ENV]!r}")


def resolve_defaults(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> CommonOptions:
    """Apply defaults to the flags added by :func:`add_common_arguments`.

    Container mode (``OTTERSCALE_CONTAINER=true``) defaults to ``--address=:8299
    --config=/etc/app/otterscale.yaml``; otherwise ``--address=:8299 --config=otterscale.yaml``.
    Explicit flags always win. ``environ`` defaults to the process environment.
    """
    container = container_mode(environ)
    address = getattr(args, "address", None)
    if address is None:
        address = DEFAULT_ADDRESS
    config = getattr(args, "config", None)
    if config is None:
        config = CONTAINER_CONFIG if container else DEFAULT_CONFIG
    if not str(config).strip():
        raise UsageError("--config must not be empty")
    host, port = parse_address(address)
    return CommonOptions(
        address=address,
        host=host,
        port=port,
        config=Path(config),
        log_level=getattr(args, "log_level", None) or "info",
        log_format=getattr(args, "log_format", None) or "text",
        container=container,
    )


def parse_address(address: str) -> tuple[str, int]:
    """Split a Go-style listen address into ``(host, port)``.

    ``:8299`` gives ``("", 8299)`` (all interfaces), ``127.0.0.1:8299`` and ``host.example:8299``
    give the host, ``[::1]:8299`` gives ``("::1", 8299)``. Port 0 means "any free port". Raises
    :class:`UsageError` saying what is wrong.
    """
    text = address.strip()
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise UsageError(f"invalid address {address!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise UsageError(f"invalid address {address!r}: expected :PORT after ']'")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"invalid address {address!r}: {host!r} is not an IPv6 address") from None
    else:
        if ":" not in text:
            hint = f" (did you mean :{text}?)" if _PORT_RE.fullmatch(text) else ""
            raise UsageError(f"invalid address {address!r}: expected HOST:PORT or :PORT{hint}")
        if text.count(":") > 1:
            raise UsageError(
                f"invalid address {address!r}: write IPv6 addresses in brackets, e.g. [::1]:8299"
            )
        host, port_text = text.split(":")
        if host and not _HOST_RE.fullmatch(host):
            raise UsageError(f"invalid address {address!r}: {host!r} is not a host name or IP address")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise UsageError(f"invalid address {address!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


# --------------------------------------------------------------------------------------------------
# The otterscale command


@dataclass(frozen=True, slots=True)
class _Command:
    name: str
    distribution: str
    version: str
    summary: str
    load: Callable[[], CommandMain]


def _installed_commands() -> dict[str, _Command]:
    commands: dict[str, _Command] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in commands:
            logger.warning(
                "command %r is registered twice; using %s",
                entry_point.name,
                commands[entry_point.name].distribution,
            )
            continue
        dist = entry_point.dist
        commands[entry_point.name] = _Command(
            name=entry_point.name,
            distribution=dist.name if dist is not None else "?",
            version=dist.version if dist is not None else "?",
            summary=(dist.metadata["Summary"] or "") if dist is not None else "",
            load=entry_point.load,
        )
    return commands


def _help(commands: Mapping[str, _Command]) -> str:
    names = sorted(set(commands) | set(KNOWN_COMMANDS))
    width = max(len(name) for name in names) + 2
    lines = ["usage: otterscale <command> [options]", "", "commands:"]
    for name in names:
        command = commands.get(name)
        if command is not None:
            detail = f"{command.summary} ({command.distribution} {command.version})".strip()
        else:
            detail = f"not installed: pip install {KNOWN_COMMANDS[name]}"
        lines.append(f"  {name.ljust(width)}{detail}")
    lines += [
        "",
        "Run `otterscale <command> --help` for the options of a command.",
        f"With {CONTAINER_ENV}=true, --address defaults to {DEFAULT_ADDRESS} "
        f"and --config to {CONTAINER_CONFIG}.",
    ]
    return "\n".join(lines) + "\n"


def _version() -> str:
    try:
        return importlib.metadata.version("otterscale-common")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otterscale`` console script: dispatch to an installed subcommand."""
    args = list(sys.argv[1:] if argv is None else argv)
    return _dispatch(args, _installed_commands(), out=sys.stdout, err=sys.stderr)


def _dispatch(args: list[str], commands: Mapping[str, _Command], *, out: IO[str], err: IO[str]) -> int:
    if not args:
        err.write(_help(commands))
        return 2
    name, rest = args[0], args[1:]
    if name in ("-h", "--help", "help"):
        out.write(_help(commands))
        return 0
    if name == "--version":
        out.write(f"otterscale-common {_version()}\n")
        for command in sorted(commands.values(), key=lambda c: c.name):
            out.write(f"{command.distribution} {command.version} ({command.name})\n")
        return 0
    if name.startswith("-"):
        err.write(f"otterscale: unknown option {name}; the command comes first (otterscale --help)\n")
        return 2
    found = commands.get(name)
    if found is None:
        if name in KNOWN_COMMANDS:
            dist = KNOWN_COMMANDS[name]
            err.write(f"otterscale: the `{name}` command needs {dist}: pip install {dist}\n")
        else:
            available = ", ".join(sorted(commands)) or "none installed"
            err.write(
                f"otterscale: unknown command `{name}` (available: {available}); see otterscale --help\n"
            )
        return 2
    command = found
    try:
        target = command.load()
    except Exception as exc:  # any import-time failure of a plug-in: report it, do not trace back
        err.write(
            f"otterscale: cannot load the `{name}` command from {command.distribution}: "
            f"{type(exc).__name__}: {exc}\n"
        )
        return 1
    try:
        status = target(rest)
    except ConfigError as exc:
        err.write(f"otterscale {name}: {exc}\n")
        return 1
    except UsageError as exc:
        err.write(f"otterscale {name}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if status is None else int(status)
