"""Sampling profiles of the hub and the agent under load: py-spy, and perf where it works.

``py-spy record --gil --format raw`` writes collapsed stacks (``frame;frame;... count``) of the
thread holding the GIL, i.e. Python code running (native code such as upb or OpenSSL called
with the GIL held is attributed to the calling Python line). Why ``--gil``: without it py-spy
counts a thread as busy whenever the OS says it is runnable, and on this oversubscribed 2-core
machine a process that wakes a peer with ``send()`` is often preempted right inside that call,
so socket writes looked like half the agent's CPU while ``perf`` showed ~1% there. Each profile
also records the process's real CPU seconds over the same window, to compare with the samples.

:func:`summarize` turns a file into the share of samples per package (first path component of
the frame's file: ``hypercorn``, ``h2``, ``connectrpc``, ``otterscale.hub``...), the top
functions by self samples and by inclusive samples. ``perf record`` (if installed and allowed)
adds the split of true on-CPU time by library: the CPython interpreter, the kernel, OpenSSL,
upb.

The process is not paused while sampled (``--nonblocking``), so profiling perturbs the
measurement little; profiles are still taken in separate runs from the measured ones.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


@dataclass
class Recording:
    """One running ``py-spy record``; :meth:`finish` waits for it."""

    name: str
    pid: int
    output: Path
    process: subprocess.Popen[bytes] | None
    error: str | None = None

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for py-spy; return the summary (or the error)."""
        if self.process is not None:
            try:
                _, stderr = self.process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                _, stderr = self.process.communicate()
            if self.process.returncode != 0 or not self.output.exists():
                self.error = stderr.decode(errors="replace").strip().splitlines()[:3].__str__()
        if self.error is not None:
            logger.warning("profile of %s failed: %s", self.name, self.error)
            return {"name": self.name, "error": self.error}
        result = summarize(self.output)
        result["name"] = self.name
        result["file"] = self.output.name
        return result


def record(name: str, pid: int, output: Path, seconds: float, *, rate: int = 100) -> Recording:
    """Start sampling ``pid`` for ``seconds`` into ``output`` (collapsed stacks)."""
    binary = py_spy_binary()
    if binary is None:
        return Recording(name, pid, output, None, error="py-spy is not installed")
    output.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(rate),
        "--duration",
        str(max(1, round(seconds))),
    ]
    argv += ["--format", "raw", "--output", str(output), "--nonblocking", "--gil"]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return Recording(name, pid, output, process)


@dataclass
class PerfRecording:
    """One running ``perf record`` (on-CPU samples, no call graphs); :meth:`finish` waits."""

    name: str
    output: Path
    process: subprocess.Popen[bytes] | None
    error: str | None = None

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        if self.process is None:
            return {"error": self.error or "perf is not installed"}
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        if not self.output.exists() or self.output.stat().st_size == 0:
            return {"error": stderr.decode(errors="replace").strip()[-300:] or "no data"}
        report = subprocess.run(
            ["perf", "report", "-i", str(self.output), "--sort", "dso", "--stdio", "-g", "none"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        shares = []
        for line in report.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].endswith("%") and not line.startswith("#"):
                shares.append([parts[1], float(parts[0].rstrip("%"))])
        self.output.unlink(missing_ok=True)  # binary and large; the shares are what we keep
        return {"dso": shares[:10]} if shares else {"error": "perf report gave nothing"}


def perf_record(name: str, pid: int, output: Path, seconds: float) -> PerfRecording:
    """Start ``perf record`` on ``pid`` for ``seconds`` (best effort: perf may be absent or denied)."""
    binary = shutil.which("perf")
    if binary is None:
        return PerfRecording(name, output, None, "perf is not installed")
    argv = [binary, "record", "-F", "499", "-p", str(pid), "-o", str(output), "--", "sleep", str(seconds)]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return PerfRecording(name, output, process)


def _package(file: str) -> str:
    if not file or file.startswith("<"):
        return "(other)"
    parts = file.split("/")
    if parts[0] == "otterscale" and len(parts) > 1:
        return f"otterscale.{parts[1]}"
    if len(parts) == 1:
        return parts[0].removesuffix(".py")  # a stdlib module such as ssl.py or selectors.py
    return parts[0]


def _split(frame: str) -> tuple[str, str]:
    match = _FRAME_RE.match(frame)
    if match is None:
        return frame, ""
    return f"{match['func']} ({match['file']})", match["file"]


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Shares of samples: per package (self time), top self and inclusive functions."""
    total = 0
    self_funcs: Counter[str] = Counter()
    incl_funcs: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_split(f) for f in stack.split(";")]
        leaf, leaf_file = frames[-1]
        self_funcs[leaf] += count
        packages[_package(leaf_file)] += count
        for func in {f for f, _ in frames}:
            incl_funcs[func] += count

    def shares(counter: Counter[str], n: int) -> list[list[Any]]:
        return [[name, round(100.0 * c / total, 1)] for name, c in counter.most_common(n)] if total else []

    return {
        "samples": total,
        "packages": shares(packages, top),
        "self": shares(self_funcs, top),
        "inclusive": shares(incl_funcs, top),
    }
