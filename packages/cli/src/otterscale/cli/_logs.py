"""``otterscale logs POD``: a pod's log through the hub (PodLog), like ``kubectl logs``."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import BinaryIO

from google.protobuf import timestamp_pb2  # type: ignore[import-untyped]  # no stubs for protobuf 7

from otterscale.common import UsageError
from otterscale.runtime.v1 import runtime_pb2 as pb

from ._options import ClientOptions, add_client_arguments, open_client, run_command

__all__ = ["build_parser", "main", "parse_duration"]

_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> int:
    """Seconds of ``1h30m``, ``5m``, ``45s`` or a plain number of seconds."""
    if text.isdigit():
        return int(text)
    found = _DURATION.fullmatch(text)
    if not text or found is None or not any(found.groups()):
        raise UsageError(f"--since {text!r}: expected a duration such as 30s, 5m or 1h")
    hours, minutes, seconds = (int(g or 0) for g in found.groups())
    return hours * 3600 + minutes * 60 + seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otterscale logs",
        description="Print a pod's log (PodLog through the hub, as the calling user).",
    )
    parser.add_argument("pod", help="the pod's name")
    parser.add_argument("-c", "--container", default="", help="the container (default: as kubectl chooses)")
    parser.add_argument("--all-containers", action="store_true", help="every container of the pod")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    parser.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")
    parser.add_argument("--since", default=None, metavar="DURATION", help="only lines newer than e.g. 5m")
    parser.add_argument("--since-time", default=None, metavar="RFC3339", help="only lines since this time")
    parser.add_argument("-p", "--previous", action="store_true", help="the previous instance's log")
    parser.add_argument("--timestamps", action="store_true", help="prefix each line with its time")
    parser.add_argument("--limit-bytes", type=int, default=None, metavar="N", help="stop after N bytes")
    parser.add_argument("--prefix", action="store_true", help="prefix each line with [pod/container]")
    add_client_arguments(parser)
    return parser


def request_from(args: argparse.Namespace, options: ClientOptions) -> pb.PodLogRequest:
    request = pb.PodLogRequest(
        cluster=options.cluster,
        namespace=options.namespace,
        name=args.pod,
        container=args.container,
        follow=args.follow,
        previous=args.previous,
        timestamps=args.timestamps,
        all_containers=args.all_containers,
    )
    if args.tail is not None:
        request.tail_lines = args.tail
    if args.since is not None:
        request.since_seconds = parse_duration(args.since)
    if args.since_time is not None:
        stamp = timestamp_pb2.Timestamp()
        try:
            stamp.FromJsonString(args.since_time)
        except ValueError:
            raise UsageError(
                f"--since-time {args.since_time!r}: expected RFC 3339, e.g. 2026-01-02T03:04:05Z"
            ) from None
        request.since_time.CopyFrom(stamp)
    if args.limit_bytes is not None:
        request.limit_bytes = args.limit_bytes
    return request


class _Prefixer:
    """Puts ``[pod/container] `` before each line (chunks end at newlines where possible)."""

    def __init__(self, pod: str, out: BinaryIO) -> None:
        self._pod = pod
        self._out = out
        self._at_line_start: dict[str, bool] = {}

    def write(self, container: str, data: bytes) -> None:
        prefix = f"[pod/{self._pod}/{container}] ".encode()
        start = self._at_line_start.get(container, True)
        lines = data.split(b"\n")
        out = bytearray()
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if line or not last:
                if start:
                    out += prefix
                out += line
            if not last:
                out += b"\n"
                start = True
            else:
                start = not line
        self._at_line_start[container] = start
        self._out.write(bytes(out))


async def run(args: argparse.Namespace, options: ClientOptions, out: BinaryIO | None = None) -> int:
    out = out if out is not None else sys.stdout.buffer
    request = request_from(args, options)
    prefixer = _Prefixer(args.pod, out) if args.prefix else None
    async with open_client(options) as client:
        async for message in client.pod_log(request):
            if not message.data:
                continue  # a heartbeat
            if prefixer is not None:
                prefixer.write(message.container, message.data)
            else:
                out.write(message.data)
            out.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``otterscale logs`` (entry point of the ``otterscale`` command)."""
    return run_command("logs", build_parser(), argv, run)
