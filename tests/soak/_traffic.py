"""The soak's clients: workers doing List/Get/Apply/Delete, watchers, and the expected-state model.

Each worker owns its objects (``w<worker>-o<k>`` in each cluster's namespace) and runs one
operation at a time, so for every object there is exactly one writer and the expected state is
simply what its last successful write said: present with content ``v`` (Apply OK), absent
(Delete OK), or unknown (an operation that gave up after retrying: it may or may not have
happened; the next successful write makes it known again).

A call is retried as a real client would: on unavailable and deadline_exceeded, with jittered
exponential backoff, on a random hub replica each time, until the operation's budget runs out.
Apply is idempotent (server-side apply of the same content); a Delete that gets not_found after
an earlier ambiguous attempt (unavailable or deadline_exceeded: it may have been executed) is
done. Reads are checked against the model as they happen (Get and List must see every write that
returned OK, and no object whose Delete returned OK).

Watchers follow the informer pattern through the hub: List, then Watch from the list's
resourceVersion, resume from the last seen resourceVersion when the stream ends, List again only
when the server says the version is too old (410). Their view of the namespace must converge to
the cluster's real state once traffic stops: a resumed watch that skipped an event would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format  # type: ignore[import-untyped]  # no stubs for protobuf 7
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient

logger = logging.getLogger(__name__)

#: Attempts that may fail during faults and are retried.
RETRYABLE = (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
UNKNOWN = "?"  # expected state of an object after an operation that gave up
OBJECTS_PER_WORKER = 6
ATTEMPT_TIMEOUT_MS = 10_000


def code_name(code: Code | None) -> str:
    return "ok" if code is None else code.name.lower()


def reraise_cancellation(exc: ConnectError) -> None:
    """connectrpc turns the cancellation of the calling task into ``ConnectError(CANCELED)``;
    turn it back, or a cancelled client would carry on as if a call had failed."""
    task = asyncio.current_task()
    if exc.code is Code.CANCELED and task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


@dataclass
class Expected:
    """What one object must look like: ``value`` (its data.v), None (absent) or UNKNOWN."""

    cluster: str
    namespace: str
    name: str
    value: str | None = None  # never written: absent
    last: str = "initial"


@dataclass
class ApiserverRestarts:
    """Whether a kube-apiserver is (re)starting right now, set by the fault injector.

    A kube-apiserver that has just started serves requests before its RBAC informers have synced
    and refuses them with 403 meanwhile (Kubernetes behaviour; the agent passes it on as
    permission_denied). During a restart and for ``GRACE`` seconds after it answers /readyz,
    permission_denied is retried and counted, not an unexpected error; at any other time it is.
    """

    GRACE = 10.0
    in_progress: int = 0
    grace_until: float = 0.0

    def started(self) -> None:
        self.in_progress += 1

    def ready(self) -> None:
        self.in_progress -= 1
        self.grace_until = time.monotonic() + self.GRACE

    def now(self) -> bool:
        return self.in_progress > 0 or time.monotonic() < self.grace_until


@dataclass
class Stats:
    """Counters shared by every client."""

    #: Attempts (requests) by (rpc, code): "ok", "unavailable", "not_found", ...
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Operations by (rpc, result): "ok", "done_not_found", "expected_not_found", "gave_up".
    operations: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Broken promises: lost writes, resurrected deletes, stale reads (must be empty).
    violations: list[str] = field(default_factory=list)
    #: Codes no client should ever see (internal, unknown, permission_denied...): must be empty.
    unexpected: list[str] = field(default_factory=list)
    watch: Counter[str] = field(default_factory=Counter)
    apiserver: ApiserverRestarts = field(default_factory=ApiserverRestarts)

    def retryable(self, code: Code) -> bool:
        """Retried: unavailable and deadline_exceeded; permission_denied while an API server starts."""
        return code in RETRYABLE or (code is Code.PERMISSION_DENIED and self.apiserver.now())

    def violation(self, text: str) -> None:
        logger.error("violation: %s", text)
        self.violations.append(text)

    def unexpected_error(self, rpc: str, exc: BaseException) -> None:
        text = f"{rpc}: {type(exc).__name__}: {getattr(exc, 'code', '')} {exc}"[:500]
        logger.error("unexpected: %s", text)
        self.unexpected.append(text)


class Clients:
    """One HTTP/2 client per hub replica (as a Service spreads new connections), closed at the end."""

    def __init__(self, urls: list[str], *, timeout_ms: int | None) -> None:
        self._transports = [HTTPTransport(http_version=HTTPVersion.HTTP2, connect_timeout=1.0) for _ in urls]
        self.replicas = [
            ResourceServiceClient(url, http_client=Client(t), timeout_ms=timeout_ms)
            for url, t in zip(urls, self._transports, strict=True)
        ]

    def any(self, rng: random.Random) -> ResourceServiceClient:
        return rng.choice(self.replicas)

    async def close(self) -> None:
        for transport in self._transports:
            await transport.aclose()


def _value_of(obj: dict[str, Any]) -> str | None:
    data = obj.get("data") or {}
    value = data.get("v")
    return str(value) if value is not None else None


def _name_of(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


class Worker:
    """One client: random operations on its own objects in both clusters until told to stop."""

    def __init__(
        self,
        number: int,
        namespaces: dict[str, str],
        urls: list[str],
        token: str,
        stats: Stats,
        *,
        seed: int,
        op_budget: float,
    ) -> None:
        self.number = number
        self.namespaces = namespaces
        self.stats = stats
        self.rng = random.Random(seed)
        self.op_budget = op_budget
        self.headers = {"authorization": f"Bearer {token}"}
        self.clients = Clients(urls, timeout_ms=ATTEMPT_TIMEOUT_MS)
        self.objects = {
            (cluster, f"w{number}-o{k}"): Expected(cluster, namespace, f"w{number}-o{k}")
            for cluster, namespace in namespaces.items()
            for k in range(OBJECTS_PER_WORKER)
        }
        self.writes = 0
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        while not self.stopping.is_set():
            rpc = self.rng.choices(["List", "Get", "Apply", "Delete"], weights=[2, 3, 4, 2])[0]
            cluster = self.rng.choice(sorted(self.namespaces))
            if rpc == "List":
                await self.list(cluster)
            else:
                obj = self.objects[(cluster, f"w{self.number}-o{self.rng.randrange(OBJECTS_PER_WORKER)}")]
                await getattr(self, rpc.lower())(obj)
            # A little think time: the soak is about faults, not throughput (2 shared cores).
            await asyncio.sleep(self.rng.uniform(0.01, 0.05))

    async def call(self, rpc: str, invoke: Any) -> tuple[Any, Code | None, bool]:
        """Attempt until OK, a non-retryable code, or the budget is spent.

        Returns (response, final code or None, whether an earlier attempt was ambiguous); the final
        code is DEADLINE_EXCEEDED when the budget ran out on retryable errors.
        """
        deadline = time.monotonic() + self.op_budget
        ambiguous = False
        delay = 0.1
        while True:
            try:
                response = await invoke(self.clients.any(self.rng))
            except ConnectError as exc:
                reraise_cancellation(exc)
                self.stats.requests[(rpc, code_name(exc.code))] += 1
                if not self.stats.retryable(exc.code):
                    return None, exc.code, ambiguous
                ambiguous = ambiguous or exc.code in RETRYABLE  # a refusal is not ambiguous
                if time.monotonic() + delay > deadline:
                    return None, Code.DEADLINE_EXCEEDED, ambiguous
                await asyncio.sleep(delay * self.rng.uniform(0.5, 1.5))
                delay = min(delay * 2, 2.0)
                continue
            self.stats.requests[(rpc, "ok")] += 1
            return response, None, ambiguous

    def _gave_up(self, rpc: str, obj: Expected | None) -> None:
        self.stats.operations[(rpc, "gave_up")] += 1
        if obj is not None:
            obj.value, obj.last = UNKNOWN, f"{rpc} gave up"

    async def apply(self, obj: Expected) -> None:
        self.writes += 1
        value = f"{self.number}.{self.writes}"
        manifest = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": obj.name,
                "namespace": obj.namespace,
                "labels": {"soak": "1", "soak-worker": str(self.number)},
            },
            "data": {"v": value, "pad": "x" * self.rng.randrange(64, 1024)},
        }
        request = pb.ApplyRequest(
            cluster=obj.cluster,
            version="v1",
            resource="configmaps",
            namespace=obj.namespace,
            name=obj.name,
            manifest=json.dumps(manifest).encode(),
            force=True,
            field_manager="soak",
        )
        response, code, _ = await self.call("Apply", lambda c: c.apply(request, headers=self.headers))
        if code in RETRYABLE:
            self._gave_up("Apply", obj)
        elif code is not None:
            self.stats.unexpected_error("Apply", ConnectError(code, f"{obj.cluster}/{obj.name}"))
            obj.value, obj.last = UNKNOWN, "Apply failed"
        else:
            got = _value_of(json_format.MessageToDict(response.object))
            if got != value:
                self.stats.violation(f"Apply {obj.cluster}/{obj.name} returned v={got}, sent {value}")
            obj.value, obj.last = value, f"Apply {value}"
            self.stats.operations[("Apply", "ok")] += 1

    async def delete(self, obj: Expected) -> None:
        request = pb.DeleteRequest(
            cluster=obj.cluster, version="v1", resource="configmaps", namespace=obj.namespace, name=obj.name
        )
        _, code, ambiguous = await self.call("Delete", lambda c: c.delete(request, headers=self.headers))
        if code in RETRYABLE:
            self._gave_up("Delete", obj)
            return
        if code is Code.NOT_FOUND:
            if ambiguous:
                self.stats.operations[("Delete", "done_not_found")] += 1  # an earlier attempt did it
            elif obj.value is None or obj.value == UNKNOWN:
                self.stats.operations[("Delete", "expected_not_found")] += 1
            else:
                self.stats.violation(
                    f"lost write: Delete {obj.cluster}/{obj.name} found nothing after {obj.last} returned OK"
                )
            obj.value, obj.last = None, "Delete (not found)"
            return
        if code is not None:
            self.stats.unexpected_error("Delete", ConnectError(code, f"{obj.cluster}/{obj.name}"))
            obj.value, obj.last = UNKNOWN, "Delete failed"
            return
        self.stats.operations[("Delete", "ok")] += 1
        obj.value, obj.last = None, "Delete"

    async def get(self, obj: Expected) -> None:
        request = pb.GetRequest(
            cluster=obj.cluster, version="v1", resource="configmaps", namespace=obj.namespace, name=obj.name
        )
        expected = obj.value
        response, code, _ = await self.call("Get", lambda c: c.get(request, headers=self.headers))
        if code in RETRYABLE:
            self._gave_up("Get", None)
            return
        if code is Code.NOT_FOUND:
            if expected not in (None, UNKNOWN):
                self.stats.violation(f"lost write: Get {obj.cluster}/{obj.name} not found after {obj.last}")
            self.stats.operations[("Get", "expected_not_found")] += 1
            return
        if code is not None:
            self.stats.unexpected_error("Get", ConnectError(code, f"{obj.cluster}/{obj.name}"))
            return
        got = _value_of(json_format.MessageToDict(response.object))
        if expected is None:
            self.stats.violation(f"resurrected: Get {obj.cluster}/{obj.name} found v={got} after {obj.last}")
        elif expected != UNKNOWN and got != expected:
            self.stats.violation(f"stale read: Get {obj.cluster}/{obj.name} v={got}, expected {expected}")
        self.stats.operations[("Get", "ok")] += 1

    async def list(self, cluster: str) -> None:
        namespace = self.namespaces[cluster]
        request = pb.ListRequest(
            cluster=cluster,
            version="v1",
            resource="configmaps",
            namespace=namespace,
            label_selector=f"soak-worker={self.number}",
        )
        snapshot = {name: o.value for (c, name), o in self.objects.items() if c == cluster}
        response, code, _ = await self.call("List", lambda c: c.list(request, headers=self.headers))
        if code in RETRYABLE:
            self._gave_up("List", None)
            return
        if code is not None:
            self.stats.unexpected_error("List", ConnectError(code, f"{cluster}/{namespace}"))
            return
        seen = {}
        for item in response.items:
            obj = json_format.MessageToDict(item.object)
            seen[_name_of(obj)] = _value_of(obj)
        for name, expected in snapshot.items():
            if expected == UNKNOWN:
                continue
            if expected is None and name in seen:
                self.stats.violation(f"resurrected: List {cluster} shows {name} v={seen[name]} (deleted)")
            elif expected is not None and seen.get(name) != expected:
                self.stats.violation(
                    f"lost write: List {cluster} shows {name} v={seen.get(name)}, not {expected}"
                )
        self.stats.operations[("List", "ok")] += 1

    async def close(self) -> None:
        await self.clients.close()


class Watcher:
    """An informer over one cluster's soak namespace, through the hub (see the module docstring)."""

    def __init__(
        self, cluster: str, namespace: str, urls: list[str], token: str, stats: Stats, *, seed: int
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.stats = stats
        self.rng = random.Random(seed)
        self.headers = {"authorization": f"Bearer {token}"}
        self.clients = Clients(urls, timeout_ms=None)
        self.view: dict[str, str | None] = {}
        self.resource_version = ""
        self.synced = False

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                if not self.resource_version:
                    await self._relist()
                await self._watch()
                delay = 0.1
            except ConnectError as exc:
                reraise_cancellation(exc)
                self.stats.requests[("Watch", code_name(exc.code))] += 1
                if not self.stats.retryable(exc.code):
                    self.stats.unexpected_error("Watch", exc)
                await asyncio.sleep(delay * self.rng.uniform(0.5, 1.5))
                delay = min(delay * 2, 2.0)
            self.stats.watch["streams_ended"] += 1  # then resumed from resource_version

    async def _relist(self) -> None:
        request = pb.ListRequest(
            cluster=self.cluster,
            version="v1",
            resource="configmaps",
            namespace=self.namespace,
            label_selector="soak=1",
        )
        response = await self.clients.any(self.rng).list(request, headers=self.headers)
        self.stats.requests[("List", "ok")] += 1
        self.stats.watch["lists"] += 1
        self.view = {}
        for item in response.items:
            obj = json_format.MessageToDict(item.object)
            self.view[_name_of(obj)] = _value_of(obj)
        self.resource_version = response.resource_version

    async def _watch(self) -> None:
        request = pb.WatchRequest(
            cluster=self.cluster,
            version="v1",
            resource="configmaps",
            namespace=self.namespace,
            label_selector="soak=1",
            resource_version=self.resource_version,
        )
        stream: AsyncIterator[pb.WatchEvent] = self.clients.any(self.rng).watch(request, headers=self.headers)
        try:
            async for event in stream:
                self._apply(event)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        self.stats.requests[("Watch", "ok")] += 1  # the stream ended normally (e.g. after a 410)

    def _apply(self, event: pb.WatchEvent) -> None:
        self.stats.watch["events"] += 1
        if event.type == pb.WatchEvent.TYPE_ERROR:
            status = json_format.MessageToDict(event.status)
            if int(status.get("code", 0)) == 410:
                self.stats.watch["expired_relists"] += 1
                self.resource_version = ""  # List again, as an informer does
                return
            self.stats.unexpected_error("Watch", RuntimeError(f"error event {status}"))
            return
        if event.resource_version:
            self.resource_version = event.resource_version
        if event.type == pb.WatchEvent.TYPE_BOOKMARK:
            return
        obj = json_format.MessageToDict(event.resource.object)
        name = _name_of(obj)
        if event.type == pb.WatchEvent.TYPE_DELETED:
            self.view.pop(name, None)
        else:
            self.view[name] = _value_of(obj)

    async def close(self) -> None:
        await self.clients.close()
