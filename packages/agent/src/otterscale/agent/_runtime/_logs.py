"""PodLog: a container's log (or every container's) as a stream of line-aligned chunks.

Options are Kubernetes' PodLogOptions, passed on as given (presence matters: ``tail_lines = 0``
shows no earlier line, absent shows all). Chunks are at most :data:`CHUNK` (32 KiB, the
original's size) and end at a newline where possible, so a client can print them as they come;
a line still incomplete after :data:`PARTIAL_FLUSH` (100 ms) is sent as it is (a prompt, a
progress bar), and a line longer than a chunk is cut. When nothing was sent for the heartbeat
interval an empty message goes out, so proxies keep the stream open.

``all_containers``: every container (init, regular, ephemeral), one after the other without
``follow`` (as kubectl prints them), all at once with ``follow``; each message names its
container. The stream ends OK when every log ended; when the agent stops, with unavailable.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp

from otterscale.common import Identity

from .._errors import InvalidRequestError, KubernetesUnavailableError
from .._kube import KubeClient
from ._pods import pod_path
from ._pump import END, TIMEOUT, Pump

logger = logging.getLogger(__name__)

__all__ = ["CHUNK", "PARTIAL_FLUSH", "LogChunk", "LogOptions", "PumpHook", "follow_logs"]

CHUNK = 32 * 1024
PARTIAL_FLUSH = 0.1

#: Told about each pump while it runs (True) and when it is done (False): the service keeps
#: them, to stop open logs when the agent shuts down.
PumpHook = Callable[[Pump[str], bool], None]


@dataclasses.dataclass(frozen=True, slots=True)
class LogOptions:
    """PodLogOptions, with None where the request left a presence-tracked option out."""

    follow: bool = False
    previous: bool = False
    timestamps: bool = False
    tail_lines: int | None = None
    since_seconds: int | None = None
    since_time: datetime.datetime | None = None
    limit_bytes: int | None = None

    def check(self) -> None:
        for field in ("tail_lines", "limit_bytes"):
            value = getattr(self, field)
            if value is not None and value < 0:
                raise InvalidRequestError(f"{field} must not be negative")
        if self.since_seconds is not None and self.since_seconds < 1:
            raise InvalidRequestError("since_seconds must be at least 1")
        if self.limit_bytes is not None and self.limit_bytes < 1:
            raise InvalidRequestError("limit_bytes must be at least 1 (leave it out for no limit)")
        if self.since_seconds is not None and self.since_time is not None:
            raise InvalidRequestError("give since_seconds or since_time, not both")

    def params(self, container: str) -> dict[str, str]:
        params = {"container": container}
        for flag in ("follow", "previous", "timestamps"):
            if getattr(self, flag):
                params[flag] = "true"
        if self.tail_lines is not None:
            params["tailLines"] = str(self.tail_lines)
        if self.since_seconds is not None:
            params["sinceSeconds"] = str(self.since_seconds)
        if self.since_time is not None:
            params["sinceTime"] = self.since_time.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.limit_bytes is not None:
            params["limitBytes"] = str(self.limit_bytes)
        return params


@dataclasses.dataclass(frozen=True, slots=True)
class LogChunk:
    """Bytes of one container's log; empty ``data`` and ``container`` is a heartbeat."""

    container: str
    data: bytes


async def _read_log(
    client: KubeClient, caller: Identity, path: str, params: Mapping[str, str]
) -> AsyncIterator[bytes]:
    async with client.stream(path, params=params, caller=caller, accept="*/*") as resp:
        try:
            async for piece in resp.content.iter_any():
                yield piece
        except aiohttp.ClientError as exc:
            raise KubernetesUnavailableError(f"the log stream from kubernetes API broke: {exc}") from exc


class _Lines:
    """One container's buffer: complete lines go out at once, a partial line after a delay."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.partial_since: float | None = None

    def add(self, data: bytes, now: float) -> list[bytes]:
        self.buffer += data
        out: list[bytes] = []
        while len(self.buffer) >= CHUNK:
            cut = self.buffer.rfind(b"\n", 0, CHUNK) + 1 or CHUNK
            out.append(bytes(self.buffer[:cut]))
            del self.buffer[:cut]
        cut = self.buffer.rfind(b"\n") + 1
        if cut:
            out.append(bytes(self.buffer[:cut]))
            del self.buffer[:cut]
            self.partial_since = None
        if self.buffer and self.partial_since is None:
            self.partial_since = now
        return out

    def flush(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        self.partial_since = None
        return data


async def follow_logs(
    client: KubeClient,
    caller: Identity,
    *,
    namespace: str,
    pod: str,
    containers: list[str],
    options: LogOptions,
    heartbeat: float,
    on_pump: PumpHook | None = None,
) -> AsyncIterator[LogChunk]:
    """The chunks of the containers' logs (see the module docstring)."""
    path = pod_path(namespace, pod, "log")
    groups = [containers] if options.follow else [[c] for c in containers]
    last_sent = time.monotonic()
    for group in groups:
        pump: Pump[str] = Pump(
            {c: _read_log(client, caller, path, options.params(c)) for c in group},
            name=f"runtime-log-reader-{pod}",
        )
        if on_pump is not None:
            on_pump(pump, True)
        lines = {c: _Lines() for c in group}
        try:
            while True:
                now = time.monotonic()
                deadline = last_sent + heartbeat
                partial = [b.partial_since for b in lines.values() if b.partial_since is not None]
                if partial:
                    deadline = min(deadline, min(partial) + PARTIAL_FLUSH)
                got = await pump.get(max(deadline - now, 0.0))
                now = time.monotonic()
                if got is END:
                    for container, buffer in lines.items():
                        if buffer.buffer:
                            yield LogChunk(container, buffer.flush())
                    break
                if got is TIMEOUT:
                    flushed = False
                    for container, buffer in lines.items():
                        if buffer.partial_since is not None and now - buffer.partial_since >= PARTIAL_FLUSH:
                            yield LogChunk(container, buffer.flush())
                            flushed = True
                    if flushed:
                        last_sent = time.monotonic()
                    elif now - last_sent >= heartbeat:
                        yield LogChunk("", b"")
                        last_sent = time.monotonic()
                    continue
                container, data = got
                for chunk in lines[container].add(data, now):
                    yield LogChunk(container, chunk)
                    last_sent = time.monotonic()
        finally:
            if on_pump is not None:
                on_pump(pump, False)
            await pump.close()
