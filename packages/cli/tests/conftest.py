"""Fixtures of the CLI's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_garbage_of_earlier_tests(no_leftover_event_loops: None) -> None:
    """``run_command`` collects garbage before its loop ends (see ``_options``): anything another
    package's tests left unreferenced but uncollected would be reported in a CLI test. The plugin's
    ``no_leftover_event_loops`` clears it first."""
