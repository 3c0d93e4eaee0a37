"""Supervision of one external process: spawn, drain its output, restart it, stop it for sure.

The hub runs ``chisel server`` and the agent runs ``chisel client`` through :class:`Supervisor`,
which gives every external process the same guarantees:

- its own process group (a stop reaches its children too) and, on Linux, the parent-death signal
  (SIGKILL), so not even a SIGKILLed service leaves an orphan holding a port;
- an environment that is exactly :attr:`ProcessSpec.env`: nothing is inherited, so a stray
  ``AUTH``, ``HOST`` or ``PORT`` in the service's own environment can never reach the child;
- stdout and stderr merged, drained line by line, logged (at DEBUG unless told otherwise) and
  handed to ``on_output``; the last lines are kept for error messages;
- readiness with a deadline: :meth:`Supervisor.start` returns once a line satisfies ``ready``
  (or at once without a predicate) and raises :class:`ProcessError` with the output tail if the
  process cannot be spawned, exits first, or is not ready in time;
- restarts with exponential backoff after an unexpected exit (once the first start succeeded);
- a stop that escalates (SIGTERM to the group, bounded wait, SIGKILL, reap) and cannot be
  cancelled halfway: :meth:`Supervisor.stop` shields the termination.

The parent-death signal is tied to the thread that spawned the child, so spawn from the thread
that lives as long as the service (the event loop's thread, as asyncio does).

Never logs the environment: it carries secrets (the chisel client's ``AUTH``, the server's key
seed). Only the program name, the pid and exit codes are logged besides the child's own output.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from ._errors import OtterscaleError

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LINE_LIMIT = 1024 * 1024


class ProcessError(OtterscaleError):
    """An external process could not be started, or exited (or hung) before it was ready.

    The message names the program and the reason and ends with the last lines of its output.
    """

    connect_code: ClassVar[str] = "unavailable"


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """What to run: a name for logs, the argument vector, and the *complete* environment.

    ``env`` is all the child gets (no inheritance). Put secrets there rather than in ``argv``,
    which every local user can read in ``/proc/<pid>/cmdline``.
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    cwd: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a process needs a name")
        if not self.argv or not self.argv[0]:
            raise ValueError("argv must name a program")
        object.__setattr__(self, "argv", tuple(str(arg) for arg in self.argv))
        object.__setattr__(self, "env", dict(self.env))


@functools.cache
def _parent_death_preexec() -> Callable[[], None] | None:
    """A preexec function that makes the kernel SIGKILL the child when its parent dies.

    libc's ``prctl`` is resolved here, in the parent: the child only calls it (no ``dlopen``
    between fork and exec, where another thread could have held the loader's lock).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


class Supervisor:
    """Runs one external process for as long as the service wants it (see the module docstring).

    ``ready(line)`` says whether an output line shows the process is ready (None: ready once
    spawned). ``on_output(line)`` sees every line (without the newline); ``on_exit(code)`` runs
    after every exit (a negative code is the signal that killed it); ``on_restart(count)`` runs
    before each respawn. Callbacks run on the event loop and must not block; an exception in
    one is logged and ignored.

    Backoff between restarts starts at ``backoff_initial`` seconds and doubles up to
    ``backoff_max``; it starts over after a run that lasted ``backoff_reset_after`` seconds.
    """

    def __init__(
        self,
        spec: ProcessSpec,
        *,
        ready: Callable[[str], bool] | None = None,
        on_output: Callable[[str], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
        on_restart: Callable[[int], None] | None = None,
        restart: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        backoff_reset_after: float = 30.0,
        stop_timeout: float = 5.0,
        output_level: int = logging.DEBUG,
        tail_lines: int = 40,
    ) -> None:
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if stop_timeout <= 0:
            raise ValueError("stop_timeout must be positive")
        self.spec = spec
        self._ready_predicate = ready
        self._on_output = on_output
        self._on_exit = on_exit
        self._on_restart = on_restart
        self._restart = restart
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._backoff_reset_after = backoff_reset_after
        self._stop_timeout = stop_timeout
        self._output_level = output_level
        self._tail: deque[str] = deque(maxlen=max(1, tail_lines))

        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopper: asyncio.Task[None] | None = None
        self._stop_requested = False
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._ever_ready = False
        self._first_failure: ProcessError | None = None
        self._first_done = asyncio.Event()
        self.restarts = 0
        self.last_exit_code: int | None = None

    # ----------------------------------------------------------------------------------------------
    # State

    @property
    def name(self) -> str:
        """The process name given in the spec."""
        return self.spec.name

    @property
    def pid(self) -> int | None:
        """The pid of the running incarnation, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether an incarnation is alive right now."""
        return self.pid is not None

    @property
    def is_ready(self) -> bool:
        """Whether the running incarnation has shown readiness."""
        return self._ready.is_set()

    def tail(self) -> list[str]:
        """The last lines of output (across restarts), oldest first."""
        return list(self._tail)

    # ----------------------------------------------------------------------------------------------
    # Start and stop

    async def start(self, ready_timeout: float = 10.0) -> None:
        """Spawn the process and wait until it is ready.

        Raises :class:`ProcessError` (and leaves nothing running) when it cannot be spawned,
        exits before it is ready, or is not ready within ``ready_timeout`` seconds.
        """
        if self._task is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._task = asyncio.create_task(self._run(), name=f"supervisor:{self.name}")
        self._task.add_done_callback(self._task_done)
        ready = asyncio.ensure_future(self._ready.wait())
        first_done = asyncio.ensure_future(self._first_done.wait())
        try:
            await asyncio.wait(
                {ready, first_done}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            await self.stop()
            raise
        finally:
            ready.cancel()
            first_done.cancel()
        if self._ever_ready:
            return
        failure = self._first_failure
        if failure is None and self._task.done() and not self._task.cancelled():
            crash = self._task.exception()
            if crash is not None:
                failure = ProcessError(f"supervising {self.name} failed: {type(crash).__name__}: {crash}")
                failure.__cause__ = crash
        if failure is None:
            failure = ProcessError(f"{self.name} was not ready within {ready_timeout:g}s{self._tail_text()}")
        await self.stop()
        raise failure

    async def stop(self) -> None:
        """Stop the process (SIGTERM, wait, SIGKILL) and the restart loop; idempotent.

        The termination runs in its own task and is shielded: cancelling the caller does not leave
        a half-stopped process behind.
        """
        self._stop_requested = True
        self._wake.set()
        if self._stopper is None:
            self._stopper = asyncio.create_task(self._terminate(), name=f"supervisor-stop:{self.name}")
        await asyncio.shield(self._stopper)

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is not None:
            await self._kill(proc)
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._stop_timeout)
            except TimeoutError:
                logger.warning(
                    "%s (pid %d) did not stop within %gs; killing it", self.name, proc.pid, self._stop_timeout
                )
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        # The leader is gone; make sure nothing else of its group lingers.
        _signal_group(proc.pid, signal.SIGKILL)

    # ----------------------------------------------------------------------------------------------
    # The run loop

    async def _run(self) -> None:
        backoff = self._backoff_initial
        try:
            while not self._stop_requested:
                try:
                    proc = await self._spawn()
                except ProcessError as exc:
                    if not self._ever_ready:
                        self._fail(exc)
                        return
                    logger.error("%s could not be restarted: %s", self.name, exc)
                else:
                    started = time.monotonic()
                    code = await self._supervise(proc)
                    if self._stop_requested:
                        return
                    if not self._ever_ready:
                        self._fail(
                            ProcessError(
                                f"{self.name} exited with {_describe_exit(code)} before it was ready"
                                f"{self._tail_text()}"
                            )
                        )
                        return
                    if not self._restart:
                        logger.error("%s exited with %s; not restarting", self.name, _describe_exit(code))
                        return
                    if time.monotonic() - started >= self._backoff_reset_after:
                        backoff = self._backoff_initial
                    logger.warning(
                        "%s exited with %s; restarting in %.1fs", self.name, _describe_exit(code), backoff
                    )
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                if self._stop_requested:
                    return
                self.restarts += 1
                self._call(self._on_restart, self.restarts)
        finally:
            self._first_done.set()

    async def _spawn(self) -> asyncio.subprocess.Process:
        spec = self.spec
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(spec.env),
                cwd=spec.cwd,
                start_new_session=True,
                preexec_fn=_parent_death_preexec(),
                limit=_LINE_LIMIT,
            )
        except OSError as exc:
            raise ProcessError(f"cannot start {spec.name} ({spec.argv[0]}): {exc.strerror or exc}") from exc
        # Registered before the first await, so a stop can always find it.
        self._proc = proc
        self._ready.clear()
        logger.debug("%s started (pid %d)", spec.name, proc.pid)
        if self._ready_predicate is None:
            self._mark_ready()
        if self._stop_requested:
            await self._kill(proc)
        return proc

    async def _supervise(self, proc: asyncio.subprocess.Process) -> int:
        assert proc.stdout is not None
        try:
            await self._drain(proc.stdout)
            code = await proc.wait()
        except asyncio.CancelledError:
            await asyncio.shield(self._kill(proc))
            raise
        self._ready.clear()
        self.last_exit_code = code
        self._call(self._on_exit, code)
        return code

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: skip what was buffered
                raw = await stream.read(_LINE_LIMIT)
                if not raw:
                    return
                continue
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._tail.append(line)
            # ("process" is taken: LogRecord.process is the pid.)
            logger.log(self._output_level, "%s: %s", self.name, line, extra={"program": self.name})
            self._call(self._on_output, line)
            if not self._ready.is_set() and self._ready_predicate is not None:
                try:
                    ready = self._ready_predicate(line)
                except Exception:
                    logger.exception("readiness check of %s failed", self.name)
                    ready = False
                if ready:
                    self._mark_ready()

    def _mark_ready(self) -> None:
        self._ever_ready = True
        self._ready.set()

    def _fail(self, exc: ProcessError) -> None:
        self._first_failure = exc

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        if self._stop_requested:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _call(self, callback: Callable[[int], None] | Callable[[str], None] | None, value: object) -> None:
        if callback is None:
            return
        try:
            callback(value)  # type: ignore[arg-type]
        except Exception:
            logger.exception("callback of %s failed", self.name)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("supervisor of %s ended unexpectedly", self.name, exc_info=exc)
        elif not self._stop_requested and self._ever_ready:
            logger.error("%s is no longer supervised (it will not be restarted)", self.name)

    def _tail_text(self) -> str:
        if not self._tail:
            return " (no output)"
        return "; last output:\n  " + "\n  ".join(self._tail)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
