"""A hub or an agent under test: an OS process started from the installed ``otterscale`` command.

Tests of the hub and the agent talk to them only at their ports, as users and the other side do:
the API, ``/readyz``, ``/ping``, ``/metrics``, the process's log (JSON lines) and its children
(chisel). Nothing of the service runs in the test's process, so a test never depends on how the
service serves HTTP (or on its private objects), and a service that embeds its own server (Envoy
with Python inside, say) is tested exactly like one that does not.

- :class:`HubProcess`: ``otterscale server --address HOST:PORT --config ...``; ready when
  ``/readyz`` answers 200; :attr:`HubProcess.fingerprint` is read from its log;
  :meth:`HubProcess.connected` is its ``otterscale_hub_tunnel_up`` gauge.
- :class:`AgentProcess`: ``otterscale agent --cluster NAME ...``; serving when ``/ping`` answers
  204, ready (tunnel up) when ``/readyz`` answers 200.
- :class:`Metrics`: a ``/metrics`` scrape, looked up by name and labels.

Both are :class:`~otterscale.testing.ManagedProcess`\\ es: own process group, log file, the
parent-death signal (a SIGKILLed pytest leaves no orphan) and an escalating, idempotent stop.
Every wait has a deadline and fails with the tail of the log. A restart is a new object with
the same arguments (ports and configuration stay, so the other side reconnects on its own).

Spawn only from the main thread: a child's parent-death signal fires when the *thread* that
spawned it exits, so a service started from ``asyncio.to_thread`` would be killed when the
executor's worker thread goes away (:func:`spawning_thread_check`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._process import ManagedProcess, child_pids, free_port

#: Seconds a started hub has to answer ``/readyz``; an agent to answer ``/ping``.
SERVICE_START_TIMEOUT = 60.0

#: What the services must not inherit from the test's environment (it would change them).
_SCRUBBED_ENV = ("OTTERSCALE_", "KUBECONFIG", "POD_", "KUBERNETES_", "AUTH", "HOST", "PORT")


def otterscale_command() -> list[str]:
    """The installed ``otterscale`` console script next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name("otterscale")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("otterscale")
    if found is None:
        raise RuntimeError("the `otterscale` command is not installed (pip install otterscale-hub)")
    return [found]


def service_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A service's environment: the test's minus anything that would change its behaviour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV)}
    env.update(extra or {})
    return env


def spawning_thread_check() -> None:
    """Refuse to spawn from a thread other than the main one (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "start hubs and agents from the main thread: a child process gets SIGKILL when the "
            "thread that spawned it exits (parent-death signal), e.g. an asyncio.to_thread worker"
        )


def http_get(url: str, *, timeout: float = 3.0) -> tuple[int, str] | None:
    """``(status, body)`` of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback test URL
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return None


def http_ok(url: str, *, timeout: float = 3.0) -> bool:
    """A GET of ``url`` answers 2xx."""
    answer = http_get(url, timeout=timeout)
    return answer is not None and 200 <= answer[0] < 300


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float, what: str, *, every: float = 0.1
) -> float:
    """Await ``check()`` until true; the seconds it took, or TimeoutError after ``within``."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what} not within {within}s")
        await asyncio.sleep(every)


# --------------------------------------------------------------------------------------------------
# /metrics

_SAMPLE_RE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = frozenset[tuple[str, str]]


class Metrics:
    """One scrape of a Prometheus text exposition (``/metrics``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, Labels], float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            match = _SAMPLE_RE.match(line)
            if match is None:
                continue
            labels = frozenset(
                (key, value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                for key, value in _LABEL_RE.findall(match["labels"] or "")
            )
            self.samples[(match["name"], labels)] = float(match["value"])

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels (None when there is none)."""
        return self.samples.get((name, frozenset(labels.items())))

    def get(self, name: str, **labels: str) -> float:
        """Like :meth:`value`, 0 for a sample not exported (yet): a counter that never counted."""
        return self.value(name, **labels) or 0.0

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include these."""
        wanted = set(labels.items())
        return sum(v for (n, found), v in self.samples.items() if n == name and wanted <= found)

    def __iter__(self) -> Iterator[tuple[str, dict[str, str], float]]:
        for (name, labels), value in self.samples.items():
            yield name, dict(labels), value

    def tunnels(self) -> dict[str, bool]:
        """A hub's view of each cluster: connected or not (its ``otterscale_hub_tunnel_up``)."""
        return {
            labels["cluster"]: value == 1.0
            for name, labels, value in self
            if name == "otterscale_hub_tunnel_up"
        }


# --------------------------------------------------------------------------------------------------
# The processes


class ServiceProcess(ManagedProcess):
    """A hub or an agent process listening on ``host:port`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_file: Path,
        *,
        host: str,
        port: int,
        env: Mapping[str, str] | None = None,
    ) -> None:
        spawning_thread_check()
        self.host = host
        self.port = port
        self.spawned = time.monotonic()
        super().__init__(name, argv, log_file, env=service_env() if env is None else env)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # --- what the process shows -------------------------------------------------------------------

    def log(self) -> str:
        """The whole log so far (stdout and stderr)."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (``--log-format=json``) so far, decoded."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    found.append(record)
        return found

    def children(self, command: str | None = None) -> list[int]:
        """The pids of this process's live children (only ``command``'s, e.g. ``chisel``)."""
        return child_pids(self.pid, command) if self.alive() else []

    def metrics(self) -> Metrics:
        """Scrape ``/metrics`` (unauthenticated)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:  # noqa: S310
            return Metrics(resp.read().decode())

    async def ametrics(self) -> Metrics:
        """:meth:`metrics` without blocking the event loop."""
        return await asyncio.to_thread(self.metrics)

    def rss(self) -> int:
        """Resident memory of the service, in bytes: this process and every process below it but
        chisel (``otterscale server`` runs the hub inside Envoy, its child)."""
        total = 0
        for pid in [self.pid, *(p for p in child_pids(self.pid) if _comm(p) != "chisel")]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:  # gone meanwhile
                continue
        if not total:
            raise RuntimeError(f"no VmRSS for {self.name}")
        return total

    async def until(
        self, check: Callable[[], bool | Awaitable[bool]], within: float, what: str, *, every: float = 0.05
    ) -> float:
        """Poll ``check`` (sync or async) until true; the seconds it took. Fails with the log tail
        if the process exits first or ``within`` passes."""
        started = time.monotonic()
        while True:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before {what}; "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise TimeoutError(
                    f"{self.name}: not {what} within {within:g}s; log {self.log_file}:\n{self.log_tail()}"
                )
            await asyncio.sleep(every)

    async def exited(self, within: float = 30.0) -> int:
        """Wait (without blocking the loop) for the process to exit; its status."""
        return await asyncio.to_thread(self.popen.wait, within)


class HubProcess(ServiceProcess):
    """``otterscale server`` (see the module docstring).

    ``routed_services`` (``"module:Service"``) adds test-only cluster-routed services (for example
    :data:`~otterscale.testing.ECHO_ROUTE`), ``hub_services`` (``"module:Service=module:factory"``)
    test-only services the hub answers itself (:data:`~otterscale.testing.ECHO_HUB_SERVICE`): the
    hub then runs through ``python -m otterscale.testing._launcher``, which calls
    ``otterscale.hub.main`` with them.
    ``args`` are more flags (``--leader-elect``...); ``env`` replaces :func:`service_env`.
    """

    def __init__(
        self,
        config: Path,
        log_file: Path,
        *,
        name: str = "hub",
        host: str = "127.0.0.1",
        port: int | None = None,
        chisel: str | Path | None = None,
        drain_timeout: float | None = None,
        log_level: str = "debug",
        args: Sequence[str] = (),
        routed_services: Sequence[str] = (),
        hub_services: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        management_port: int | None = None,
        separate_management: bool = True,
        command: Sequence[str] | None = None,
    ) -> None:
        port = port if port is not None else free_port(host)
        #: Where ``/metrics`` and the per-cluster health are (a free port of its own unless
        #: ``separate_management`` is off: a hub that predates the management address).
        self.management_port = (
            (management_port if management_port is not None else free_port(host))
            if separate_management
            else None
        )
        if command is not None:
            command = list(command)
        elif routed_services or hub_services:
            command = [sys.executable, "-m", "otterscale.testing._launcher"]
            for service in routed_services:
                command += ["--route", service]
            for service in hub_services:
                command += ["--serve", service]
            command.append("--")
        else:
            command = otterscale_command()
        argv = [
            *command,
            "server",
            f"--address={host}:{port}",
            f"--config={config}",
            "--log-format=json",
            f"--log-level={log_level}",
        ]
        if self.management_port is not None:
            argv.append(f"--management-address={host}:{self.management_port}")
        if chisel is not None:
            argv.append(f"--chisel={chisel}")
        if drain_timeout is not None:
            argv.append(f"--drain-timeout={drain_timeout:g}")
        self._fingerprint: str | None = None
        super().__init__(name, [*argv, *args], log_file, host=host, port=port, env=env)

    @property
    def management_url(self) -> str:
        """The management address (``/metrics``, per-cluster health); the API's without one."""
        if self.management_port is None:
            return self.url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.management_port}"

    def metrics(self) -> Metrics:
        """Scrape ``/metrics`` on the management address."""
        with urllib.request.urlopen(self.management_url + "/metrics", timeout=5) as resp:  # noqa: S310
            return Metrics(resp.read().decode())

    def wait_ready(self, timeout: float = SERVICE_START_TIMEOUT) -> HubProcess:
        """Block until ``/readyz`` answers 200 (a follower is ready without a tunnel server)."""
        self.wait_until(lambda: http_ok(self.url + "/readyz"), timeout=timeout, what="ready (/readyz)")
        return self

    async def ready(self) -> bool:
        """``/readyz`` answers 200 right now."""
        return await asyncio.to_thread(http_ok, self.url + "/readyz")

    async def wait_ready_async(self, within: float = SERVICE_START_TIMEOUT) -> HubProcess:
        """:meth:`wait_ready` without blocking the event loop."""
        await self.until(self.ready, within, "ready (/readyz)")
        return self

    @property
    def fingerprint(self) -> str:
        """The tunnel fingerprint the hub logged at start-up."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_from_log(self.log_file)
            if self._fingerprint is None:
                raise RuntimeError(f"{self.name} logged no tunnel fingerprint; log:\n{self.log_tail()}")
        return self._fingerprint

    def chisel_pid(self) -> int | None:
        """The hub's chisel server (its child process), None while it runs none."""
        pids = self.children("chisel")
        return pids[-1] if pids else None

    def connected(self, cluster: str) -> bool:
        """The hub reports ``cluster``'s agent connected (its ``otterscale_hub_tunnel_up`` gauge)."""
        return self.metrics().value("otterscale_hub_tunnel_up", cluster=cluster) == 1.0

    async def wait_connected(self, cluster: str, connected: bool = True, within: float = 30.0) -> float:
        """Wait until the hub reports ``cluster`` (dis)connected; the seconds it took."""

        async def check() -> bool:
            return (await self.ametrics()).value("otterscale_hub_tunnel_up", cluster=cluster) == (
                1.0 if connected else 0.0
            )

        state = "connected" if connected else "disconnected"
        return await self.until(check, within, f"reporting cluster {cluster} {state}", every=0.1)


class AgentProcess(ServiceProcess):
    """``otterscale agent --cluster NAME`` (see the module docstring).

    Without ``tunnel_server_url`` (and ``tunnel=False``) it runs ``--no-tunnel``: the agent alone,
    reached at :attr:`url` directly with calls signed like the hub's.
    """

    def __init__(
        self,
        cluster: str,
        config: Path,
        kubeconfig: Path | str,
        log_file: Path,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        tunnel: bool = True,
        chisel: str | Path | None = None,
        tunnel_server_url: str | None = None,
        log_level: str = "debug",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        port = port if port is not None else free_port(host)
        argv = [
            *(otterscale_command() if command is None else command),
            "agent",
            f"--cluster={cluster}",
            f"--address={host}:{port}",
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            "--log-format=json",
            f"--log-level={log_level}",
        ]
        if not tunnel:
            argv.append("--no-tunnel")
        else:
            if chisel is not None:
                argv.append(f"--chisel={chisel}")
            if tunnel_server_url is not None:
                argv.append(f"--tunnel-server-url={tunnel_server_url}")
        self.cluster = cluster
        super().__init__(name or f"agent-{cluster}", [*argv, *args], log_file, host=host, port=port, env=env)

    def wait_serving(self, timeout: float = SERVICE_START_TIMEOUT) -> AgentProcess:
        """Block until ``/ping`` answers (the agent serves; its tunnel may still be coming up)."""
        self.wait_until(lambda: http_ok(self.url + "/ping"), timeout=timeout, what="answering /ping")
        return self

    async def ready(self) -> bool:
        """``/readyz`` answers 200 right now (with a tunnel: it is up)."""
        return await asyncio.to_thread(http_ok, self.url + "/readyz")

    def chisel_pids(self) -> list[int]:
        """The agent's chisel client (its child process)."""
        return self.children("chisel")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def fingerprint_from_log(log: Path) -> str | None:
    """The tunnel fingerprint a hub logged (the ``fingerprint`` field of a JSON line)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("fingerprint"):
            return str(record["fingerprint"])
    return None
