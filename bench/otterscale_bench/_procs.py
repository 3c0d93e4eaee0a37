"""CPU time and memory of the processes under test, read from /proc (through psutil).

A :class:`ProcessSet` names the processes of one system: the hub and the chisel server it
supervises, the agent and its chisel client, kube-apiserver and etcd, and the benchmark client
itself. A service that runs inside Envoy is the Envoy process (Envoy and the service's Python
both run there); its command (``otterscale server``, the launcher) is named ``<service>-launcher``.
CPU is user + system seconds of each process alone (not its children); :meth:`ProcessSet.threads`
splits an Envoy process by thread (the Python event loop, Envoy's worker, pyqwest's runtime). Peak RSS of a
phase comes from the kernel's high-water mark (``VmHWM``), which is reset at the start of the
phase by writing ``5`` to ``/proc/<pid>/clear_refs``; where that is not allowed, a sampler
thread's maximum is used instead (:class:`RSSSampler` runs either way and gives a timeline).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class CPUSnapshot:
    """CPU seconds per process name at one moment (monotonic time ``at``)."""

    at: float
    seconds: dict[str, float]

    def delta(self, earlier: CPUSnapshot) -> dict[str, float]:
        return {name: self.seconds[name] - earlier.seconds.get(name, 0.0) for name in self.seconds}


class ProcessSet:
    """Named processes; dead ones read as zero so a phase never fails on a metric."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        # A name without a process (None: a service without a launcher) reads as zero.
        self._procs = {name: psutil.Process(pid) if pid else None for name, pid in pids.items()}
        self._hwm_reset_works = True

    @property
    def names(self) -> list[str]:
        return list(self._procs)

    def pid(self, name: str) -> int:
        proc = self._procs[name]
        if proc is None:
            raise KeyError(f"no process {name}")
        return int(proc.pid)

    def threads(self, name: str) -> dict[str, float]:
        """CPU seconds of process ``name`` by kind of thread: ``python`` (pyvoy's event loop and
        anything else Envoy's first thread started, named ``envoy``), ``envoy-main``, ``envoy-worker``
        (``wrk:*``), ``pyqwest`` (``tokio-rt-*``), ``other``."""
        proc = self._procs.get(name)
        out: dict[str, float] = {}
        if proc is None:
            return out
        ticks = os.sysconf("SC_CLK_TCK")
        try:
            tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
        except OSError:
            return out
        for task in tasks:
            try:
                comm = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / ticks
            if int(task.name) == proc.pid:
                kind = "envoy-main" if comm == "envoy" else "main"
            elif comm == "envoy":
                kind = "python"
            elif comm.startswith("wrk:"):
                kind = "envoy-worker"
            elif comm.startswith("tokio-rt"):
                kind = "pyqwest"
            else:
                kind = "other"
            out[kind] = out.get(kind, 0.0) + seconds
        return out

    def cpu(self) -> CPUSnapshot:
        seconds: dict[str, float] = {}
        for name, proc in self._procs.items():
            if proc is None:
                seconds[name] = 0.0
                continue
            try:
                times = proc.cpu_times()
                seconds[name] = times.user + times.system
            except psutil.Error:
                seconds[name] = 0.0
        # Busy seconds of the whole machine (all cores), to tell how loaded it was besides us.
        total = psutil.cpu_times()
        seconds["(machine)"] = (
            total.user + total.nice + total.system + total.irq + total.softirq + total.steal
        )
        return CPUSnapshot(time.monotonic(), seconds)

    def rss(self, names: Iterable[str] | None = None) -> dict[str, float]:
        """Resident memory in MiB now."""
        out: dict[str, float] = {}
        for name in names or self._procs:
            proc = self._procs.get(name)
            try:
                out[name] = proc.memory_info().rss / MIB if proc is not None else 0.0
            except psutil.Error:
                out[name] = 0.0
        return out

    def reset_peak(self, names: Iterable[str]) -> None:
        """Start a new peak-RSS window (``VmHWM`` := current RSS) for ``names``."""
        for name in names:
            proc = self._procs.get(name)
            if proc is None:
                continue
            try:
                with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError as exc:
                if self._hwm_reset_works:
                    logger.warning("cannot reset peak RSS (%s); peaks come from sampling", exc)
                self._hwm_reset_works = False

    def peak(self, names: Iterable[str], sampled: Mapping[str, float] | None = None) -> dict[str, float]:
        """Peak RSS in MiB since :meth:`reset_peak` (the sampled maximum if the reset failed)."""
        out: dict[str, float] = {}
        for name in names:
            value = 0.0
            proc = self._procs.get(name)
            if self._hwm_reset_works and proc is not None:
                value = _vm_hwm(proc.pid)
            if sampled is not None:
                value = max(value, sampled.get(name, 0.0))
            out[name] = value
        return out


def _vm_hwm(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def envoy_of(pid: int) -> int | None:
    """The Envoy process a service command (its launcher) runs its service in; None if it has
    none (a service that serves itself)."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.Error):
                if child.name() == "envoy":
                    return int(child.pid)
    return None


def child_pid(parent: int, name: str, *, timeout: float = 10.0) -> int:
    """The pid of ``parent``'s descendant whose executable is called ``name`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(parent).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.name() == name or os.path.basename(child.exe()) == name:
                        return int(child.pid)
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {parent} has no child named {name!r}")
        time.sleep(0.1)


@dataclass
class RSSSampler:
    """Samples RSS of some processes every ``interval`` seconds in a thread (a timeline)."""

    procs: ProcessSet
    names: list[str]
    interval: float = 0.5
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def __enter__(self) -> RSSSampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, self.procs.rss(self.names)))
            self._stop.wait(self.interval)

    def maximum(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, values in self.samples:
            for name, value in values.items():
                out[name] = max(out.get(name, 0.0), value)
        return out
