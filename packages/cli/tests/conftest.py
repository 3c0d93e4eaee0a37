"""Fixtures of the CLI's tests."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest


@pytest.fixture(autouse=True)
def no_garbage_of_earlier_tests(request: pytest.FixtureRequest) -> None:
    """Leave no earlier test's event loop or garbage for the CLI's own ``gc.collect()``.

    ``run_command`` collects garbage before its loop ends (see ``_options``), so anything another
    package's tests left unreferenced but uncollected (above all the event loops pytest-asyncio
    1.2 creates with ``asyncio.get_event_loop()`` around its fixtures and never closes) would be
    reported as unclosed sockets in whichever CLI test ran first after them: a ResourceWarning,
    an error in these tests, that says nothing about the CLI. So before each sync test: close a
    loop still set as current, and collect what is already garbage, its warnings ignored here
    (they belong to the tests that leaked it).
    """
    if request.node.get_closest_marker("asyncio") is not None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            loop = asyncio.get_event_loop()
        except RuntimeError:
            loop = None
        if loop is not None and not loop.is_running() and not loop.is_closed():
            loop.close()
        asyncio.set_event_loop(None)
        gc.collect()
