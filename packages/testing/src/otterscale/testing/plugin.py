"""pytest plugin (entry point ``pytest11: otterscale``): fixtures that start real components.

- ``control_plane``: one real Kubernetes control plane for the whole session.
- ``control_plane_factory``: ``factory(name)`` starts (or returns the already running) cluster
  ``name``; every cluster is stopped at session end, also after Ctrl-C or a failed test.

A missing binary fails the test with the exact command that builds it; nothing is skipped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import pytest

from ._controlplane import ControlPlane, start_control_plane
from .tools import ToolMissingError

logger = logging.getLogger(__name__)

ControlPlaneFactory = Callable[[str], ControlPlane]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("otterscale")
    group.addoption(
        "--keep-cluster-dirs",
        action="store_true",
        help="keep control-plane data and logs after the run (paths are printed)",
    )


@pytest.fixture(scope="session")
def control_plane_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ControlPlaneFactory]:
    running: dict[str, ControlPlane] = {}

    def factory(name: str) -> ControlPlane:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name):
            raise ValueError(f"cluster name {name!r} must be a short DNS label")
        if name not in running:
            try:
                running[name] = start_control_plane(name, tmp_path_factory.mktemp(f"cluster-{name}"))
            except ToolMissingError as exc:
                pytest.fail(str(exc), pytrace=False)
        return running[name]

    try:
        yield factory
    finally:
        for cp in running.values():
            cp.stop()
            if request.config.getoption("--keep-cluster-dirs"):
                logger.warning("cluster %s data kept in %s", cp.name, cp.directory)


@pytest.fixture(scope="session")
def control_plane(control_plane_factory: ControlPlaneFactory) -> ControlPlane:
    """The session's default test cluster (``test``)."""
    return control_plane_factory("test")
