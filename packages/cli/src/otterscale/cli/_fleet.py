"""``otterscale fleet list | watch``: one resource across many clusters (MultiClusterService).

The hub runs each cluster's part as the caller, so every cluster's own RBAC decides; this module
only builds the requests, pages through the hub's opaque cursor, and renders what comes back:
items and events tagged with their cluster on stdout, per-cluster outcomes on stderr.

Exit statuses: 0 every selected cluster answered OK (list) or the watch was stopped (SIGINT or
SIGTERM); 3 the list finished but some cluster did not answer OK (its outcome is in the summary);
1 the call itself failed (for ``--require-all``: any cluster not OK); 2 usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import (  # type: ignore[import-untyped]  # no stubs for protobuf 7
    duration_pb2,
    json_format,
)

from otterscale.common import UsageError
from otterscale.resource.v1 import multicluster_pb2 as pb
from otterscale.resource.v1 import resource_pb2
from otterscale.resource.v1.multicluster_connect import MultiClusterServiceClient

from ._options import ClientOptions, add_client_arguments, open_service, run_command
from ._workloads import _ALIASES

__all__ = ["FleetQuery", "main", "parse_resource", "render_status", "summary"]

#: Exit status of a list that finished with some cluster not OK.
SOME_CLUSTERS_FAILED = 3

_ORDERS = {"fair": pb.MultiListRequest.ORDER_FAIR, "cluster-major": pb.MultiListRequest.ORDER_CLUSTER_MAJOR}
_INITIAL = {
    "missing": pb.MultiWatchRequest.INITIAL_EVENTS_MISSING_ONLY,
    "all": pb.MultiWatchRequest.INITIAL_EVENTS_ALL,
    "none": pb.MultiWatchRequest.INITIAL_EVENTS_NONE,
}


@dataclasses.dataclass(frozen=True)
class FleetQuery:
    """Which clusters and what in them: the selection and query of both RPCs."""

    selection: pb.ClusterSelection
    query: pb.ResourceQuery
    options: pb.FanoutOptions


def parse_resource(text: str) -> tuple[str, str, str]:
    """(group, version, plural) of ``configmaps`` (core, v1), ``deploy`` (the workload aliases of
    ``otterscale scale``) or ``<plural>.<version>.<group>`` (``widgets.v1.example.com``)."""
    known = _ALIASES.get(text.lower())
    if known is not None:
        return known
    plural, dot, rest = text.partition(".")
    if not dot:
        if not plural or "/" in plural:
            raise UsageError(f"{text!r}: expected a plural resource name, e.g. configmaps")
        return ("", "v1", plural.lower())
    version, dot2, group = rest.partition(".")
    if not (plural and version and dot2 and group):
        raise UsageError(
            f"{text!r}: expected PLURAL (core group, v1) or PLURAL.VERSION.GROUP, e.g. widgets.v1.example.com"
        )
    return (group, version, plural)


def _number(text: str, convert: type[float] | type[int], what: str) -> float:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None


def _positive(text: str) -> float:
    """Seconds, more than 0 (argparse type)."""
    value = _number(text, float, "seconds")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text!r}")
    return value


def _count(text: str) -> int:
    """A whole number, 0 or more (argparse type)."""
    value = int(_number(text, int, "a whole number"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text!r}")
    return value


def _add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "resource",
        metavar="RESOURCE",
        help="what to list: a plural of the core group (configmaps, pods), a workload alias "
        "(deploy, sts, ds, rs) or PLURAL.VERSION.GROUP (widgets.v1.example.com)",
    )
    selection = parser.add_argument_group("clusters (both empty: every cluster you may use)")
    selection.add_argument(
        "--cluster",
        dest="clusters",
        action="append",
        default=[],
        metavar="NAME",
        help="a cluster by name; repeat for more. A name that is not configured or not allowed "
        "for you is reported as unknown_cluster",
    )
    selection.add_argument(
        "--cluster-selector",
        default="",
        metavar="SELECTOR",
        help="clusters whose configured labels match this Kubernetes label selector, e.g. "
        "'env=prod,region in (eu,us)' (with --cluster: the named clusters that also match)",
    )
    query = parser.add_argument_group("objects")
    query.add_argument("-n", "--namespace", default="", help="only this namespace (default: all namespaces)")
    query.add_argument(
        "-l", "--selector", default="", metavar="SELECTOR", help="Kubernetes label selector over the objects"
    )
    query.add_argument(
        "--field-selector",
        default="",
        metavar="SELECTOR",
        help="Kubernetes field selector over the objects, e.g. status.phase=Running",
    )
    legs = parser.add_argument_group("legs")
    legs.add_argument(
        "--per-cluster-timeout",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="how long one cluster may take for its part (default: the hub's, 10 s)",
    )
    legs.add_argument(
        "--max-concurrency",
        type=_count,
        default=0,
        metavar="N",
        help="clusters asked at once (default: the hub's, 32)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table (default): one row per object, its cluster first; json: one JSON object per "
        'line, {"cluster": ..., "object": ...} (watch: also "type" and "resourceVersion")',
    )


def _query(args: argparse.Namespace) -> FleetQuery:
    group, version, resource = parse_resource(args.resource)
    options = pb.FanoutOptions(
        max_concurrency=args.max_concurrency, require_all=getattr(args, "require_all", False)
    )
    if args.per_cluster_timeout is not None:
        options.per_cluster_timeout.CopyFrom(_duration(args.per_cluster_timeout))
    return FleetQuery(
        selection=pb.ClusterSelection(clusters=args.clusters, label_selector=args.cluster_selector),
        query=pb.ResourceQuery(
            group=group,
            version=version,
            resource=resource,
            namespace=args.namespace,
            label_selector=args.selector,
            field_selector=args.field_selector,
        ),
        options=options,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    found = duration_pb2.Duration()
    found.FromNanoseconds(round(seconds * 1e9))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otterscale fleet",
        description="List or watch one resource across many clusters in one call, each cluster "
        "as you (its own RBAC decides). Items and events are tagged with their cluster; every "
        "cluster's outcome is reported on stderr.",
        epilog="exit status: 0 all clusters OK (list) or stopped by SIGINT/SIGTERM (watch); "
        "3 some cluster not OK (list); 1 the call failed; 2 usage error",
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="{list,watch}")
    listing = commands.add_parser(
        "list",
        help="list the objects of every selected cluster, page by page",
        description="List RESOURCE in every selected cluster (MultiList), following the hub's "
        "cursor until every cluster is done. Objects go to stdout, tagged with their cluster; a "
        "per-cluster outcome summary and the resume token for 'fleet watch' go to stderr.",
        epilog="exit status: 0 every cluster OK; 3 some cluster not OK (see the summary); 1 the "
        "call failed (with --require-all: any cluster not OK); 2 usage error",
    )
    _add_query_arguments(listing)
    listing.add_argument(
        "--limit",
        type=_count,
        default=0,
        metavar="N",
        help="objects per page, all clusters together (default: the hub's, 500); every page is "
        "fetched, this only sizes them",
    )
    listing.add_argument(
        "--order",
        choices=sorted(_ORDERS),
        default="fair",
        help="fair (default): clusters advance together; cluster-major: cluster after cluster, in name order",
    )
    listing.add_argument(
        "--require-all",
        action="store_true",
        help="all or nothing: fail (exit 1) when any selected cluster does not answer OK",
    )
    add_client_arguments(listing, namespaced=False, one_cluster=False)
    watching = commands.add_parser(
        "watch",
        help="stream the changes of every selected cluster until stopped",
        description="Watch RESOURCE in every selected cluster (MultiWatch): events go to stdout, "
        "tagged with their cluster; each cluster's state (connecting, synced, resync start/end, "
        "...) and checkpoints go to stderr. Stop with Ctrl-C or SIGTERM: the last resume token is "
        "printed to stderr ('resume: TOKEN'), for --resume.",
        epilog="exit status: 0 stopped by SIGINT/SIGTERM; 1 the stream failed; 2 usage error",
    )
    _add_query_arguments(watching)
    watching.add_argument(
        "--resume",
        default="",
        metavar="TOKEN",
        help="continue from a resume token (printed by an earlier watch, or by 'fleet list' for "
        "the same clusters and query): every cluster it names resumes where it was",
    )
    watching.add_argument(
        "--initial-events",
        choices=sorted(_INITIAL),
        default="missing",
        help="missing (default): clusters without a resume point send their current objects "
        "first, as ADDED; all: every cluster does; none: only changes from now",
    )
    watching.add_argument(
        "--checkpoint-interval",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="how often the hub sends a resume point (default: 10 s; at least 1 s)",
    )
    watching.add_argument(
        "--no-resync",
        action="store_true",
        help="a cluster whose history expired (410) ends with expired instead of re-listing in band",
    )
    add_client_arguments(watching, namespaced=False, one_cluster=False)
    return parser


def _outcome(value: int) -> str:
    name: str = pb.ClusterStatus.Outcome.Name(value)
    return name.removeprefix("OUTCOME_").lower()


def render_status(status: pb.ClusterStatus) -> str:
    """``<cluster>: <outcome>[ (<code>)][: <message>]`` for stderr."""
    text = f"{status.cluster}: {_outcome(status.outcome)}"
    if status.code:
        text += f" ({status.code})"
    return f"{text}: {status.message}" if status.message else text


def summary(statuses: Iterable[pb.ClusterStatus], items: dict[str, int]) -> list[str]:
    """The per-cluster outcome table of a list (the last status of each cluster wins)."""
    rows = [("CLUSTER", "OUTCOME", "ITEMS", "MESSAGE")]
    for status in sorted(_last(statuses), key=lambda s: s.cluster):
        name = status.cluster
        outcome = _outcome(status.outcome) + (f" ({status.code})" if status.code else "")
        rows.append((name, outcome, str(items.get(name, 0)), status.message))
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    ]


def _object(resource: resource_pb2.Resource) -> dict[str, Any]:
    found: dict[str, Any] = json_format.MessageToDict(resource.object)
    return found


def _name(obj: dict[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace", "")), str(metadata.get("name", ""))


def list_rows(page: pb.MultiListResponse) -> list[tuple[str, dict[str, Any]]]:
    """(cluster, object) of a page, in the page's order."""
    return [(part.cluster, _object(item)) for part in page.lists for item in part.list.items]


def _write(out: TextIO, lines: Iterable[str]) -> None:
    for line in lines:
        out.write(line + "\n")
    out.flush()


async def fleet_list(
    args: argparse.Namespace, options: ClientOptions, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    fleet = _query(args)
    request = pb.MultiListRequest(
        selection=fleet.selection,
        query=fleet.query,
        limit=args.limit,
        order=_ORDERS[args.order],
        options=fleet.options,
    )
    statuses: list[pb.ClusterStatus] = []
    items: dict[str, int] = {}
    header = True
    async with open_service(options, MultiClusterServiceClient) as client:
        while True:
            try:
                page = await client.multi_list(request)
            except ConnectError as exc:
                if exc.code == Code.FAILED_PRECONDITION:  # --require-all: the outcomes are the details
                    found = [
                        pb.ClusterStatus.FromString(d.message_bytes)
                        for d in exc.details
                        if d.type_name == pb.ClusterStatus.DESCRIPTOR.full_name
                    ]
                    _write(err, summary(found, items))
                raise
            rows = list_rows(page)
            for cluster, _ in rows:
                items[cluster] = items.get(cluster, 0) + 1
            if args.output == "json":
                _write(out, (json.dumps({"cluster": c, "object": o}, separators=(",", ":")) for c, o in rows))
            elif rows:
                # Aligned per page (pages stream); the header once, above the first rows.
                table = [("CLUSTER", "NAMESPACE", "NAME")] if header else []
                _write(out, _table([*table, *((c, *_name(o)) for c, o in rows)]))
                header = False
            statuses.extend(page.statuses)
            if not page.next_cursor:
                break
            request.cursor = page.next_cursor
    _write(err, summary(statuses, items))
    if page.resume:
        _write(err, [f"resume: {page.resume}"])
    failed = any(s.outcome != pb.ClusterStatus.OUTCOME_OK for s in _last(statuses))
    return SOME_CLUSTERS_FAILED if failed else 0


def _last(statuses: Iterable[pb.ClusterStatus]) -> list[pb.ClusterStatus]:
    """Each cluster's last status (a later page's outcome replaces an earlier one)."""
    final: dict[str, pb.ClusterStatus] = {}
    for status in statuses:
        final[status.cluster] = status
    return list(final.values())


_EVENT_TYPES = {
    resource_pb2.WatchEvent.TYPE_ADDED: "ADDED",
    resource_pb2.WatchEvent.TYPE_MODIFIED: "MODIFIED",
    resource_pb2.WatchEvent.TYPE_DELETED: "DELETED",
    resource_pb2.WatchEvent.TYPE_BOOKMARK: "BOOKMARK",
    resource_pb2.WatchEvent.TYPE_ERROR: "ERROR",
}


def render_event(message: pb.ClusterEvent, output: str) -> str:
    """One stdout line of an event: ``CLUSTER TYPE NAMESPACE/NAME RESOURCEVERSION`` or JSON."""
    event = message.event
    kind = _EVENT_TYPES.get(event.type, "UNKNOWN")
    obj = _object(event.resource)
    if output == "json":
        return json.dumps(
            {
                "cluster": message.cluster,
                "type": kind,
                "object": obj,
                "resourceVersion": event.resource_version,
            },
            separators=(",", ":"),
        )
    namespace, name = _name(obj)
    return f"{message.cluster}  {kind}  {namespace}/{name}  {event.resource_version}".replace("  /", "  ")


async def fleet_watch(
    args: argparse.Namespace, options: ClientOptions, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    fleet = _query(args)
    request = pb.MultiWatchRequest(
        selection=fleet.selection,
        query=fleet.query,
        resume=args.resume,
        initial_events=_INITIAL[args.initial_events],
        disable_auto_resync=args.no_resync,
        options=fleet.options,
    )
    if args.checkpoint_interval is not None:
        request.checkpoint_interval.CopyFrom(_duration(args.checkpoint_interval))
    resume = args.resume

    async def pump(client: MultiClusterServiceClient) -> None:
        nonlocal resume
        async for message in client.multi_watch(request):
            kind = message.WhichOneof("kind")
            if kind == "event":
                _write(out, [render_event(message.event, args.output)])
            elif kind == "status":
                _write(err, [f"otterscale fleet watch: {render_status(message.status)}"])
            elif kind == "checkpoint":
                point = message.checkpoint
                resume = point.resume
                synced = f"{point.clusters_synced}/{point.clusters_total} synced"
                _write(err, [f"otterscale fleet watch: checkpoint ({synced})"])

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with open_service(options, MultiClusterServiceClient) as client:
            streaming = asyncio.create_task(pump(client), name="otterscale fleet watch: stream")
            stopping = asyncio.create_task(stop.wait(), name="otterscale fleet watch: signals")
            try:
                await asyncio.wait({streaming, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended = streaming.done()
                stopping.cancel()
                streaming.cancel()
                # A stream cancelled by a stop may end with the client's own "canceled" error:
                # not a failure. One that ended by itself raises its error here.
                await asyncio.gather(streaming, stopping, return_exceptions=True)
            if ended:
                streaming.result()
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if resume:
            _write(err, [f"resume: {resume}"])


async def _run(args: argparse.Namespace, options: ClientOptions) -> int:
    if args.action == "list":
        return await fleet_list(args, options)
    return await fleet_watch(args, options)


def main(argv: Sequence[str] | None = None) -> int:
    """``otterscale fleet`` (entry point of the ``otterscale`` command)."""
    return run_command("fleet", build_parser(), argv, _run)
