"""``otterscale server`` (and ``otterscale-hub``): run the hub until SIGTERM or SIGINT.

    otterscale server --address=:8299 --config=otterscale.yaml [--chisel PATH]
    otterscale server --config=otterscale.yaml --print-fingerprint

With ``OTTERSCALE_CONTAINER=true`` the address defaults to ``:8299``, the configuration to
``/etc/app/otterscale.yaml`` and the log format to JSON. The first SIGTERM or SIGINT starts a
graceful shutdown (stop accepting, end Watches, finish calls in flight within --drain-timeout,
stop chisel); a second one cancels what is left of it (chisel is still stopped).

Exit status: 0 after a requested shutdown, 1 when the hub could not start or failed, 2 for bad
command-line input.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from otterscale.common import (
    ConfigError,
    OtterscaleError,
    UsageError,
    add_common_arguments,
    configure_logging,
    load_config,
    resolve_defaults,
)

from ._hub import HubSettings, hub_version, run_hub, tunnel_fingerprint

logger = logging.getLogger(__name__)

PROG = "otterscale server"


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {hub_version()}")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a number") from None
    if not value > 0:
        raise UsageError("must be greater than 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``otterscale server`` and ``otterscale-hub``; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        options = resolve_defaults(args)
        log_format = args.log_format or ("json" if options.container else "text")
        configure_logging(options.log_level, log_format)
        config = load_config(options.config)
        if args.print_fingerprint:
            print(asyncio.run(tunnel_fingerprint(config, chisel=args.chisel)))
            return 0
        settings = HubSettings(
            config=config,
            host=options.host,
            port=options.port,
            chisel=args.chisel,
            drain_timeout=args.drain_timeout,
        )
        return asyncio.run(_serve(settings))
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    except OtterscaleError as exc:
        logger.error("cannot start the hub: %s", exc)
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


async def _serve(settings: HubSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            logger.info("received %s: shutting down", signal.Signals(signum).name)
            stop.set()
        elif main_task is not None:
            logger.warning("received %s again: cutting the shutdown short", signal.Signals(signum).name)
            main_task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await run_hub(settings, stop)
    except asyncio.CancelledError:
        return 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def console_main() -> None:
    """The ``otterscale-hub`` console script."""
    sys.exit(main())
