"""Resident memory and open file descriptors of the processes under test, read from /proc.

Every process incarnation (a hub replica, an agent, the chisel server of a leader, an agent's
chisel client, kube-apiserver, etcd, the soak driver) is tracked under a label and its pid. Its
baseline is the first sample taken once it is past its own warm-up (and past the soak's); its end
sample is taken after traffic has stopped. The fd baseline is the highest count in the first
``BASELINE_WINDOW`` seconds after it (a leak grows past that; a pool filling up does not). Only
incarnations alive at the end with a baseline can be compared; killed ones simply drop out
(they cannot leak any more).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
#: Seconds after a process's baseline during which its fd baseline is the highest count seen.
BASELINE_WINDOW = 30.0


@dataclass(frozen=True)
class Sample:
    """One reading: resident memory (MiB), open file descriptors, and when (monotonic)."""

    rss_mib: float
    fds: int
    at: float


def read(pid: int) -> Sample | None:
    """RSS and fd count of ``pid`` now (None when it is gone or a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return Sample(int(line.split()[1]) * 1024 / MIB, fds, time.monotonic())
    return None  # a zombie has no VmRSS


def by_parent(command: str) -> dict[int, list[int]]:
    """Live processes named ``command`` (their ``comm``), by parent pid: one pass over /proc."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if Path(f"/proc/{entry}/comm").read_text().strip() != command[:15]:
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                found.setdefault(int(fields[1]), []).append(int(entry))
    return found


def children(pid: int, command: str) -> list[int]:
    """Live child processes of ``pid`` named ``command``."""
    return by_parent(command).get(pid, [])


@dataclass
class Tracked:
    """One process incarnation."""

    label: str
    kind: str
    pid: int
    first_seen: float
    baseline: Sample | None = None
    #: The most fds seen in the ``BASELINE_WINDOW`` after the baseline: connection pools (to
    #: kube-apiserver, to the hub) fill up with traffic, so the first reading can be low.
    baseline_fds: int = 0
    end: Sample | None = None
    peak_rss_mib: float = 0.0


@dataclass
class ProcessWatch:
    """All incarnations seen, by pid. :meth:`see` registers, :meth:`sample` takes baselines."""

    warmup: float
    tracked: dict[int, Tracked] = field(default_factory=dict)
    baselines_from: float | None = None  # no baseline before the soak's own warm-up ends
    _counts: dict[str, int] = field(default_factory=dict)

    def see(self, pid: int, kind: str, name: str) -> None:
        if pid in self.tracked:
            return
        count = self._counts[name] = self._counts.get(name, 0) + 1
        self.tracked[pid] = Tracked(f"{name}#{count}", kind, pid, time.monotonic())

    def sample(self) -> None:
        now = time.monotonic()
        for item in self.tracked.values():
            if item.end is not None:
                continue
            reading = read(item.pid)
            if reading is None:
                continue
            item.peak_rss_mib = max(item.peak_rss_mib, reading.rss_mib)
            if (
                item.baseline is None
                and self.baselines_from is not None
                and now >= self.baselines_from
                and now - item.first_seen >= self.warmup
            ):
                item.baseline = reading
            if item.baseline is not None and now - item.baseline.at <= BASELINE_WINDOW:
                item.baseline_fds = max(item.baseline_fds, reading.fds)

    def finish(self) -> None:
        """End samples of every incarnation still alive."""
        for item in self.tracked.values():
            item.end = read(item.pid)


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN", "07": "CLOSE"}


def describe_fds(pid: int) -> dict[str, int]:
    """What ``pid``'s fds are: ``tcp <state> <local port> -> <remote port>`` for TCP sockets,
    else the kind (``pipe``, ``anon_inode:[eventpoll]``, ``socket`` for other sockets, ``file``).
    For a leak report: which connections pile up, and in which state."""
    tcp: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            tcp[inode] = (
                f"tcp {_TCP_STATES.get(state, state)} {int(local.split(':')[1], 16)}"
                f" -> {int(remote.split(':')[1], 16)}"
            )
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    kind = tcp.get(target[8:-1], "socket")
                elif target.startswith("pipe:"):
                    kind = "pipe"
                elif target.startswith("anon_inode:"):
                    kind = target
                else:
                    kind = "file"
                counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))
