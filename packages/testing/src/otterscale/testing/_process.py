"""Child processes for tests that never outlive the test run.

Each process gets its own process group (so a stop reaches its children too), output to a log
file (shown when something fails), the Linux parent-death signal (so even a SIGKILLed pytest
leaves no orphan), and a stop that escalates from SIGTERM to SIGKILL with bounded waits.

The process that starts them follows its own parent in turn (:func:`follow_parent`, armed by
the first :class:`ManagedProcess`): when that parent dies, it gets SIGTERM. Without it, a test
run or ``nox -s demo`` whose nox was stopped with SIGTERM (nox does not pass it on) lived on as
an orphan with its control planes, Keycloak, hub and agents. With it, the orphan stops: by
default Python dies at once and its children follow by their parent-death signal; the demo
handles SIGTERM and tears everything down in order.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_live: set[ManagedProcess] = set()
#: This process's parent when the module was imported (to notice one that died before we armed).
_ORIGINAL_PARENT = os.getppid()
_following = False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def follow_parent(sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when this process's parent dies (Linux; once per process; see the module docstring).

    A parent that died before this call (we were re-parented already) counts as dying now.
    """
    global _following
    if _following or not sys.platform.startswith("linux"):
        return
    _following = True
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != _ORIGINAL_PARENT:
        os.kill(os.getpid(), sig)


#: Lowest port :func:`free_port` hands out: below are well-known fixed ports (8080, 9090...).
_POOL_START = 10000
#: Fewer ports than this between ``_POOL_START`` and the ephemeral range: use the kernel's choice.
_POOL_MIN = 2000
_EPHEMERAL_DEFAULT = (32768, 60999)
_port_lock = threading.Lock()
_port_cursor: int | None = None  # next candidate index in the pool; starts at a per-process offset
_ports_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT


def _bindable(host: str, port: int) -> bool:
    """True if nothing holds ``port`` on ``host`` nor on the wildcard address (listening, bound,
    or in TIME_WAIT: the probe sets no SO_REUSEADDR, so it is stricter than the real server)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104 - a probe, closed at once
    for address in dict.fromkeys((host, wildcard)):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                return False
    return True


def holds_socket(*, local_port: int, remote_port: int, pid: int | None = None) -> bool:
    """Whether process ``pid`` (default: this one) or a process below it has a file descriptor
    open on the TCP socket between the two ports.

    For tests of a server process (a hub, an agent, which run inside Envoy, the command's
    child): a socket the server closed is gone from its fds even while the kernel still lingers
    over it (FIN_WAIT, TIME_WAIT).
    """
    proc = Path("/proc") / (str(pid) if pid is not None else "self")
    inodes = set()
    for table in ("net/tcp", "net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(proc / table) as lines:
            next(lines)  # the header
            for line in lines:
                fields = line.split()
                local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
                if (local, remote) == (local_port, remote_port):
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    members = [proc] if pid is None else [proc, *(Path("/proc") / str(p) for p in child_pids(pid))]
    for member in members:
        with contextlib.suppress(FileNotFoundError):  # the process has exited: it holds nothing
            for fd in (member / "fd").iterdir():
                with contextlib.suppress(OSError):  # an fd closed while iterating
                    if os.readlink(fd) in inodes:
                        return True
    return False


def child_pids(pid: int, command: str | None = None) -> list[int]:
    """The live (not zombie) processes below ``pid`` (children and their children: ``otterscale
    server`` runs the hub inside Envoy, its child, and chisel is Envoy's child), optionally only
    those whose command name (``/proc/<pid>/comm``, e.g. ``chisel``) is ``command``; sorted."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        state, parent = text[text.rindex(")") + 2 :].split()[:2]
        table[int(entry.name)] = (int(parent), state, comm)

    def below(candidate: int) -> bool:
        seen = 0
        while candidate in table and seen < 64:
            candidate = table[candidate][0]
            if candidate == pid:
                return True
            seen += 1
        return False

    return sorted(
        found
        for found, (_, state, comm) in table.items()
        if state != "Z" and (command is None or comm == command) and below(found)
    )


def modules_loaded_by(code: str) -> frozenset[str]:
    """The modules a fresh interpreter (this one's, with the installed packages) has loaded once it
    has run ``code``: how a test checks what a command's start-up imports, without timing it."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    # Generous: an interpreter loading a service on a loaded 2-core machine takes seconds.
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"{code!r} failed: {result.stderr[-2000:]}")
    return frozenset(result.stdout.split())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port for a test server to listen on, chosen so nothing else takes it first.

    "Bind port 0, close, pass the number on" races: until the server binds it, the kernel may
    give that port to any outgoing connection (connect() takes its local port from the ephemeral
    range) or to the next bind to port 0, in this process or any other. Under CI load that window
    is long enough to lose (chisel then fails with "address already in use"). So ports come from
    below the ephemeral range (``ip_local_port_range``), which the kernel never assigns by itself;
    each process walks that pool from its own pseudo-random offset (seeded by its pid, so parallel
    test runs start far apart), never hands out a port twice, and returns a port only after a
    probe bind on ``host`` and on the wildcard address succeeds. What remains is another process
    binding exactly that port on purpose in the meantime. Where the kernel leaves no room below
    the ephemeral range, the kernel's choice for port 0 is used (the old, racy behaviour).
    """
    global _port_cursor
    low = _ephemeral_range()[0]
    size = low - _POOL_START
    if size < _POOL_MIN:
        return _kernel_port(host)
    with _port_lock:
        if _port_cursor is None:
            _port_cursor = random.Random(os.getpid()).randrange(size)  # noqa: S311 - not a secret
        for _ in range(size):
            port = _POOL_START + _port_cursor % size
            _port_cursor = (_port_cursor + 1) % size
            if port not in _ports_handed_out and _bindable(host, port):
                _ports_handed_out.add(port)
                return port
    return _kernel_port(host)  # the whole pool is taken: unheard of, but not a reason to fail


def _kernel_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ManagedProcess:
    """One child process with a log file and an escalating, idempotent stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_file: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        follow_parent()
        self.name = name
        self.argv = list(argv)
        self.log_file = log_file
        self._terminated = False
        self._log = open(log_file, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``check`` until it is true; fail with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before {what}; "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            with contextlib.suppress(Exception):
                if check():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} not {what} after {timeout:.0f}s; log {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group; SIGKILL also to every process below it.

        A service keeps Envoy (with the service inside) in a process group of its own, so that a
        group SIGTERM drains instead of reaching Envoy: a SIGKILL must still take the whole tree
        at once, as a container's end does, not leave Envoy to a graceful parent-death stop.
        """
        if sig == signal.SIGTERM:
            self._terminated = True
        below = child_pids(self.popen.pid) if sig == signal.SIGKILL else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group (unless :meth:`signal` did already: a second SIGTERM cuts a
        service's graceful shutdown short), wait, then SIGKILL; always reaps. Safe to call twice."""
        if self.alive():
            if not self._terminated:
                self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0fs; killing", self.name, timeout)
                self.signal(signal.SIGKILL)
                self.popen.wait()
        # The leader is gone; make sure nothing else of its group lingers.
        self.signal(signal.SIGKILL)
        _live.discard(self)
        if not self._log.closed:
            self._log.close()
        return self.popen.returncode


@atexit.register
def _stop_all() -> None:
    for proc in list(_live):
        proc.stop(timeout=3)
