"""The process supervisor with real child processes (small Python scripts)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from otterscale.common import ProcessError, ProcessSpec, Supervisor


def script(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def eventually(check: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="argv"):
        ProcessSpec(name="x", argv=[])
    with pytest.raises(ValueError, match="name"):
        ProcessSpec(name="", argv=["true"])
    spec = ProcessSpec(name="x", argv=["a", "b"], env={"SECRET": "s"})
    assert spec.argv == ("a", "b")
    assert "SECRET" not in repr(spec)


async def test_environment_is_exactly_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH", "inherited:secret")
    monkeypatch.setenv("HOST", "192.0.2.1")
    lines: list[str] = []
    supervisor = Supervisor(
        ProcessSpec(
            name="env",
            argv=script("import os, json, time; print(json.dumps(dict(os.environ))); time.sleep(30)"),
            env={"ONLY": "this"},
        ),
        ready=lambda line: line.startswith("{"),
        on_output=lines.append,
    )
    await supervisor.start()
    try:
        environ = json.loads(lines[0])
        environ.pop("LC_CTYPE", None)  # Python may set it for itself (PEP 538)
        assert environ == {"ONLY": "this"}
    finally:
        await supervisor.stop()


async def test_ready_line_and_output() -> None:
    lines: list[str] = []
    supervisor = Supervisor(
        ProcessSpec(
            name="ready",
            argv=script("import time; print('warming'); time.sleep(0.2); print('READY'); time.sleep(30)"),
        ),
        ready=lambda line: line == "READY",
        on_output=lines.append,
    )
    await supervisor.start(ready_timeout=10)
    try:
        assert supervisor.running
        assert supervisor.is_ready
        assert lines == ["warming", "READY"]
        assert supervisor.tail() == ["warming", "READY"]
    finally:
        await supervisor.stop()
    assert not supervisor.running


async def test_exit_before_ready_is_an_error_with_output() -> None:
    supervisor = Supervisor(
        ProcessSpec(
            name="broken", argv=script("import sys; print('bind: address already in use'); sys.exit(3)")
        ),
        ready=lambda line: line == "READY",
    )
    with pytest.raises(ProcessError) as caught:
        await supervisor.start()
    assert "broken exited with status 3 before it was ready" in str(caught.value)
    assert "address already in use" in str(caught.value)
    assert supervisor.restarts == 0


async def test_not_ready_in_time_is_an_error_and_nothing_is_left() -> None:
    supervisor = Supervisor(
        ProcessSpec(name="slow", argv=script("import time; print('pid'); time.sleep(60)")),
        ready=lambda line: line == "READY",
    )
    with pytest.raises(ProcessError, match=r"not ready within 0\.5s"):
        await supervisor.start(ready_timeout=0.5)
    assert not supervisor.running


async def test_missing_program() -> None:
    supervisor = Supervisor(ProcessSpec(name="ghost", argv=["/nonexistent/program"]))
    with pytest.raises(ProcessError, match="cannot start ghost"):
        await supervisor.start()


async def test_restart_with_backoff_after_a_crash() -> None:
    restarts: list[int] = []
    exits: list[int] = []
    supervisor = Supervisor(
        ProcessSpec(name="crashy", argv=script("import time; print('up'); time.sleep(60)")),
        ready=lambda line: line == "up",
        on_restart=restarts.append,
        on_exit=exits.append,
        backoff_initial=0.1,
        backoff_max=0.4,
    )
    await supervisor.start()
    try:
        first = supervisor.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: supervisor.pid not in (None, first) and supervisor.is_ready)
        assert restarts == [1]
        assert exits == [-signal.SIGKILL]
        assert supervisor.restarts == 1
        second = supervisor.pid
        assert second is not None
        os.kill(second, signal.SIGTERM)
        await eventually(lambda: supervisor.pid not in (None, second) and supervisor.is_ready)
        assert supervisor.restarts == 2
    finally:
        await supervisor.stop()
    assert not supervisor.running


async def test_stop_escalates_to_sigkill_and_reaps_the_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    code = f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        child = subprocess.Popen([sys.executable, "-c", ignore])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("ready", flush=True)
        time.sleep(60)
    """
    supervisor = Supervisor(
        ProcessSpec(name="stubborn", argv=script(code)), ready=lambda line: line == "ready", stop_timeout=0.5
    )
    await supervisor.start()
    leader = supervisor.pid
    assert leader is not None
    grandchild = int(pid_file.read_text())
    started = time.monotonic()
    await supervisor.stop()
    assert time.monotonic() - started < 5
    assert not alive(leader)
    await eventually(lambda: not alive(grandchild), 5)
    await supervisor.stop()  # idempotent


async def test_stop_during_backoff_does_not_respawn() -> None:
    supervisor = Supervisor(
        ProcessSpec(name="flaky", argv=script("import time; print('up'); time.sleep(0.3)")),
        ready=lambda line: line == "up",
        backoff_initial=5.0,
        backoff_max=5.0,
    )
    await supervisor.start()
    await eventually(lambda: not supervisor.running)
    started = time.monotonic()
    await supervisor.stop()
    assert time.monotonic() - started < 2
    assert supervisor.restarts == 0


async def test_cancelled_stop_still_finishes(tmp_path: Path) -> None:
    supervisor = Supervisor(
        ProcessSpec(
            name="victim",
            argv=script(
                """
                import signal, time
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print('up')
                time.sleep(60)
                """
            ),
        ),
        ready=lambda line: line == "up",
        stop_timeout=0.5,
    )
    await supervisor.start()
    pid = supervisor.pid
    assert pid is not None
    stopping = asyncio.create_task(supervisor.stop())
    await asyncio.sleep(0.05)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    await eventually(lambda: not alive(pid), 5)


def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    """The parent-death signal: SIGKILL the supervising process, its child goes too."""
    pid_file = tmp_path / "child.pid"
    parent_code = f"""
        import asyncio, sys
        from otterscale.common import ProcessSpec, Supervisor
        async def main():
            child = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
            s = Supervisor(ProcessSpec(name="orphan", argv=child), ready=lambda line: line == "up")
            await s.start()
            open({str(pid_file)!r}, "w").write(str(s.pid))
            print("started", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """
    parent = subprocess.Popen(script(parent_code), stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "started"
        child = int(pid_file.read_text())
        assert alive(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while alive(child):
            assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
            time.sleep(0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
