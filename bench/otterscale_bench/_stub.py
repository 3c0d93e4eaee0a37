"""A minimal agent stand-in that replays recorded answers, for the 1,000-cluster fan-out rows.

1,000 real agents (a Python process of ~90 MB each, plus a chisel client) do not fit on the
benchmark machine; the rows that need that many clusters measure the *hub* (its memory and CPU for
1,000 legs), so the clusters behind the tunnels only have to answer like agents do. This process
serves ``otterscale.resource.v1.ResourceService`` on one port for every cluster at once (each
cluster's real chisel client forwards its tunnel port here):

- List replays the ConfigMaps recorded from a real agent (``--items``, a file of ListResponse
  bytes): ``limit`` and ``continue`` page through them (the continue token is the next offset);
- ``/ping`` answers 204, as the agent's liveness endpoint does (the hub probes it);
- Watch sends the recorded items as ADDED events and the end-of-initial-events bookmark when asked
  for initial events, then a MODIFIED event of the first item every ``--event-interval`` seconds,
  with increasing resourceVersions, until the hub closes the stream.

It checks nothing (no identity signature): it is part of the benchmark's load generator, not of
the system under test. The report labels these rows "stub agents".

    python -m otterscale_bench._stub --port PORT --items FILE [--event-interval SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from connectrpc.request import RequestContext

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceService, ResourceServiceASGIApplication

logger = logging.getLogger("otterscale_bench.stub")

_versions = itertools.count(1_000_000)


class StubResources(ResourceService):
    """ResourceService answering List and Watch from recorded items (see the module docstring);
    the other methods are the generated ones (unimplemented)."""

    def __init__(self, items: list[pb.Resource], event_interval: float) -> None:
        self._items = items
        self._event_interval = event_interval

    async def list(self, request: pb.ListRequest, ctx: RequestContext[Any, Any]) -> pb.ListResponse:
        start = int(getattr(request, "continue") or 0)
        end = len(self._items) if not request.limit else min(len(self._items), start + request.limit)
        response = pb.ListResponse(resource_version=str(next(_versions)), items=self._items[start:end])
        if end < len(self._items):
            setattr(response, "continue", str(end))
            response.remaining_item_count = len(self._items) - end
        return response

    async def watch(
        self, request: pb.WatchRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEvent]:
        if request.send_initial_events:
            for item in self._items:
                yield pb.WatchEvent(
                    type=pb.WatchEvent.TYPE_ADDED, resource=item, resource_version=str(next(_versions))
                )
            end = pb.WatchEvent(type=pb.WatchEvent.TYPE_BOOKMARK, resource_version=str(next(_versions)))
            end.resource.object.update(
                {"kind": "ConfigMap", "metadata": {"annotations": {"k8s.io/initial-events-end": "true"}}}
            )
            yield end
        while True:
            await asyncio.sleep(self._event_interval)
            yield pb.WatchEvent(
                type=pb.WatchEvent.TYPE_MODIFIED,
                resource=self._items[0],
                resource_version=str(next(_versions)),
            )


async def _main(args: argparse.Namespace) -> None:
    recorded = pb.ListResponse.FromString(Path(args.items).read_bytes())
    connect = ResourceServiceASGIApplication(StubResources(list(recorded.items), args.event_interval))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # The hub's prober pings every agent: answer it like the agent does.
        if scope["type"] == "http" and scope["path"] == "/ping":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await connect(scope, receive, send)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = socket.create_server(("127.0.0.1", args.port), backlog=4096)
    logger.info("stub agent serving %d recorded items on 127.0.0.1:%d", len(recorded.items), args.port)
    # A load generator, not the system under test: plain hypercorn (otterscale-testing's
    # dependency, as for its doubles), not Envoy.
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.config import Config, Sockets
    from hypercorn.utils import wrap_app

    config = Config()
    config.keep_alive_max_requests = 2**31 - 1  # hypercorn's default closes after 1000
    config.h2_max_concurrent_streams = 4096  # one hub connection carries every cluster's legs
    config.graceful_timeout = 1.0
    config.accesslog = None
    await worker_serve(
        wrap_app(app, config.wsgi_max_body_size, "asgi"),
        config,
        sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
        shutdown_trigger=stop.wait,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m otterscale_bench._stub")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--items", required=True, help="a file of ListResponse bytes recorded from a real agent"
    )
    parser.add_argument("--event-interval", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
