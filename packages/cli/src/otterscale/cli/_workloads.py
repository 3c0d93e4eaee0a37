"""``otterscale scale KIND/NAME --replicas N`` and ``otterscale restart KIND/NAME``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import TextIO

from otterscale.common import UsageError
from otterscale.runtime.v1 import runtime_pb2 as pb

from ._options import ClientOptions, add_client_arguments, open_client, run_command

__all__ = ["Workload", "parse_workload", "restart_main", "scale_main"]


@dataclasses.dataclass(frozen=True)
class Workload:
    group: str
    version: str
    resource: str
    name: str

    def __str__(self) -> str:
        kind = self.resource.removesuffix("s")
        return f"{kind}.{self.group}/{self.name}" if self.group else f"{kind}/{self.name}"


_APPS = {
    "deployments": ("deployment", "deployments", "deploy"),
    "statefulsets": ("statefulset", "statefulsets", "sts"),
    "daemonsets": ("daemonset", "daemonsets", "ds"),
    "replicasets": ("replicaset", "replicasets", "rs"),
}
_ALIASES: dict[str, tuple[str, str, str]] = {
    alias: ("apps", "v1", plural) for plural, aliases in _APPS.items() for alias in aliases
}
_ALIASES.update(
    dict.fromkeys(
        ("replicationcontroller", "replicationcontrollers", "rc"), ("", "v1", "replicationcontrollers")
    )
)


def parse_workload(text: str) -> Workload:
    """``deployment/web``, ``sts/db``, or ``<plural>.<version>.<group>/<name>`` for custom resources."""
    kind, slash, name = text.partition("/")
    if not slash or not kind or not name:
        raise UsageError(f"{text!r}: expected KIND/NAME, e.g. deployment/web")
    known = _ALIASES.get(kind.lower())
    if known is not None:
        return Workload(*known, name)
    plural, dot, rest = kind.partition(".")
    version, dot2, group = rest.partition(".")
    if not (dot and dot2 and plural and version and group):
        raise UsageError(
            f"unknown kind {kind!r}: use deployment, statefulset, daemonset, replicaset, "
            "replicationcontroller or <plural>.<version>.<group> (e.g. widgets.v1.example.com)"
        )
    return Workload(group, version, plural, name)


def _scale_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otterscale scale", description="Set the desired replicas of a workload (through its /scale)."
    )
    parser.add_argument("workload", help="KIND/NAME, e.g. deployment/web")
    parser.add_argument("--replicas", type=int, required=True, help="the desired replica count")
    parser.add_argument(
        "--current-replicas", type=int, default=None, help="scale only if the desired count is now this"
    )
    add_client_arguments(parser)
    return parser


def _restart_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otterscale restart",
        description="Roll a Deployment, DaemonSet or StatefulSet (kubectl rollout restart).",
    )
    parser.add_argument("workload", help="KIND/NAME, e.g. deployment/web")
    add_client_arguments(parser)
    return parser


async def scale(args: argparse.Namespace, options: ClientOptions, out: TextIO | None = None) -> int:
    workload = parse_workload(args.workload)
    request = pb.ScaleRequest(
        cluster=options.cluster,
        group=workload.group,
        version=workload.version,
        resource=workload.resource,
        namespace=options.namespace,
        name=workload.name,
        replicas=args.replicas,
    )
    if args.current_replicas is not None:
        request.current_replicas = args.current_replicas
    async with open_client(options) as client:
        answer = await client.scale(request)
    (out or sys.stdout).write(f"{workload} scaled ({answer.previous_replicas} -> {answer.replicas})\n")
    return 0


async def restart(args: argparse.Namespace, options: ClientOptions, out: TextIO | None = None) -> int:
    workload = parse_workload(args.workload)
    async with open_client(options) as client:
        await client.restart(
            pb.RestartRequest(
                cluster=options.cluster,
                group=workload.group,
                version=workload.version,
                resource=workload.resource,
                namespace=options.namespace,
                name=workload.name,
            )
        )
    (out or sys.stdout).write(f"{workload} restarted\n")
    return 0


def scale_main(argv: Sequence[str] | None = None) -> int:
    """``otterscale scale`` (entry point of the ``otterscale`` command)."""
    return run_command("scale", _scale_parser(), argv, scale)


def restart_main(argv: Sequence[str] | None = None) -> int:
    """``otterscale restart`` (entry point of the ``otterscale`` command)."""
    return run_command("restart", _restart_parser(), argv, restart)
