"""The agent's event loop: uvloop's where it is installed, asyncio's where it is not."""

from __future__ import annotations

import asyncio
import sys

import pytest

from otterscale.agent._cli import _event_loop_factory


def test_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is an agent dependency on CPython/Linux")
    factory = _event_loop_factory()
    assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(asyncio.sleep(0, "ran")) == "ran"
        assert isinstance(runner.get_loop(), uvloop.Loop)


def test_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    # None: main() then runs asyncio.Runner(loop_factory=None), i.e. exactly asyncio.run. (Not
    # run here: it would replace pytest-asyncio's current event loop and leak it.)
    assert _event_loop_factory() is None
