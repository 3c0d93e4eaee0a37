"""Fixtures of the CLI's tests."""

from __future__ import annotations

import asyncio
import warnings

import pytest


@pytest.fixture(autouse=True)
def no_stray_event_loop(request: pytest.FixtureRequest) -> None:
    """Close an event loop an earlier async test left set as current, before a sync test runs.

    pytest-asyncio (1.2) gets the current loop with ``asyncio.get_event_loop()`` around its
    fixtures, which makes a new loop when none is set, and leaves that loop current without
    closing it. The CLI collects garbage before its loop ends (``run_command``), and there the
    stray loop's sockets would be reported unclosed (a ResourceWarning, an error in these tests)
    in whichever CLI test came first after an async test of another package.
    """
    if request.node.get_closest_marker("asyncio") is not None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop()
        except RuntimeError:
            return
    if not loop.is_running() and not loop.is_closed():
        loop.close()
    asyncio.set_event_loop(None)
