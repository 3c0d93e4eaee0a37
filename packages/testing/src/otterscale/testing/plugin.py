"""pytest plugin (entry point ``pytest11: otterscale``): fixtures that start real components.

- ``control_plane``: one real Kubernetes control plane for the whole session.
- ``control_plane_factory``: ``factory(name)`` starts (or returns the already running) cluster
  ``name``; every cluster is stopped at session end, also after Ctrl-C or a failed test.
- ``keycloak``: one real Keycloak (realm ``otterscale``, users alice, bob, carol) for the whole
  session, started by the first test that asks for it.
- ``keycloak_factory``: ``factory(name, **options)`` starts (or returns) a separate Keycloak
  ``name`` (options as for ``start_keycloak``: ``users=``, ``access_token_lifespan=``...), for
  tests that must stop it or need another realm setup without disturbing the shared one.
- ``node``: one real single-node cluster for the session (``_node``: kubelet, containerd,
  kube-proxy, CoreDNS in a network namespace of its own), for tests that need running Pods:
  ``node.control_plane`` is its admin client, ``node.image("python")`` imports an image of
  ``nox -s images`` and returns its reference, ``node.run_pod(...)`` runs one. Needs root and the
  node tools; where they are missing the test fails saying what to install or build.
- ``otterscale_system``: the whole system for the session (``tests/e2e``): the shared Keycloak,
  two control planes ``east`` and ``west``, the hub and one agent per cluster, each a separate
  OS process started from the installed console scripts, connected by real chisel tunnels; plus
  a third configured cluster ``south`` that has no agent (it never connects).
  A test that stops the hub or an agent must start it again (``try/finally``).

``--provider=local|kind|node`` (default ``local``) chooses how ``otterscale_system`` and
``keycloak`` are provided: ``local`` as above; ``kind`` from kind clusters with the built images
and the Helm charts, Keycloak on the host (see ``_kind``); ``node`` with the same images and
charts on the test node (``node``; see ``_nodesystem``): the hub and the agents of ``east`` and
``west`` are Pods, ``east`` and ``west`` themselves are control planes as with ``local``, and
Keycloak runs on the host with its issuer on the node's side of the veth. With ``kind`` or
``node`` the session checks first what the provider needs (Docker and kind; root, the node
tools, containerd and the images of ``nox -s images``) and exits non-zero, saying what is
missing, before any test.

A missing binary fails the test with the exact command that builds it; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from . import _kind, _nodesystem
from ._controlplane import ControlPlane, start_control_plane
from ._keycloak import Keycloak, KeycloakError, start_keycloak
from ._node import Node, NodeError, NodeUnavailableError, start_node
from ._system import System, start_system
from .tools import ToolMissingError, keycloak_home, tool_path

logger = logging.getLogger(__name__)

ControlPlaneFactory = Callable[[str], ControlPlane]
#: How ``otterscale_system`` runs (``--provider``).
PROVIDERS = ("local", "kind", "node")


class KeycloakFactory(Protocol):
    """``factory(name, **options)``: start Keycloak ``name`` (options as for ``start_keycloak``,
    e.g. ``users=`` or ``access_token_lifespan=``), or return it if it already runs."""

    def __call__(self, name: str, **options: Any) -> Keycloak: ...


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("otterscale")
    group.addoption(
        "--keep-cluster-dirs",
        action="store_true",
        help="keep control-plane and Keycloak data and logs after the run (paths are printed)",
    )
    group.addoption(
        "--provider",
        choices=PROVIDERS,
        default="local",
        help="how otterscale_system runs: local OS processes (default), kind clusters with the "
        "images and Helm charts (needs Docker and kind; deploy/kind/README.md), or the images and "
        "charts on the test node (needs root; deploy/node/README.md)",
    )


def provider(config: pytest.Config) -> str:
    """The ``--provider`` of this run (``local``, ``kind`` or ``node``)."""
    return str(config.getoption("--provider"))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """``--provider=kind|node`` where it cannot run: stop now, non-zero, saying why."""
    chosen = provider(session.config)
    if chosen == "kind":
        problems = _kind.preflight()
        if problems:
            pytest.exit(_kind.unavailable_message(problems), returncode=pytest.ExitCode.USAGE_ERROR)
    elif chosen == "node":
        problems = _nodesystem.preflight()
        if problems:
            pytest.exit(_nodesystem.unavailable_message(problems), returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture
def no_leftover_event_loops(request: pytest.FixtureRequest) -> None:
    """Before a sync test: close the event loop earlier async tests left current, and collect what
    is already garbage (its warnings ignored here: they belong to the tests that leaked it).

    pytest-asyncio 1.2 creates loops with ``asyncio.get_event_loop()`` around its fixtures and
    never closes them; their self-pipe sockets are reported as unclosed (a ResourceWarning, an
    error under ``-W error``) in whichever later test happens to trigger a garbage collection,
    which then fails for something it did not do. A package whose sync tests allocate a lot (or
    collect garbage themselves) uses this from an autouse fixture of its conftest.
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


@pytest.fixture(scope="session")
def keycloak_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[KeycloakFactory]:
    running: dict[str, Keycloak] = {}

    def factory(name: str, **options: Any) -> Keycloak:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name):
            raise ValueError(f"Keycloak name {name!r} must be a short DNS label")
        if name not in running:
            try:
                running[name] = start_keycloak(tmp_path_factory.mktemp(f"keycloak-{name}"), **options)
            except (ToolMissingError, KeycloakError) as exc:
                pytest.fail(str(exc), pytrace=False)
        return running[name]

    try:
        yield factory
    finally:
        for kc in running.values():
            kc.stop()
            if request.config.getoption("--keep-cluster-dirs"):
                logger.warning("Keycloak data and log kept in %s", kc.directory)


@pytest.fixture(scope="session")
def keycloak(keycloak_factory: KeycloakFactory, request: pytest.FixtureRequest) -> Keycloak:
    """The session's shared Keycloak. A test that stops it must start it again (``try/finally``).

    With ``--provider=kind`` its issuer is on the kind network's gateway (``kind_keycloak``), with
    ``--provider=node`` on the node's side of the veth (``node_keycloak``)."""
    chosen = provider(request.config)
    if chosen in ("kind", "node"):
        found: Keycloak = request.getfixturevalue(f"{chosen}_keycloak")
        return found
    return keycloak_factory("default")


@pytest.fixture(scope="session")
def kind_clusters(request: pytest.FixtureRequest) -> Iterator[Path]:
    """``--provider=kind``: the hub and agent kind clusters with the images loaded (deleted after,
    kept with ``--keep-cluster-dirs``); yields the source checkout of the charts and values."""
    try:
        tool_path("helm"), keycloak_home()  # what the later steps need, before the slow ones
        root = _kind.repo_root()
        with _kind.kind_clusters(root, keep=bool(request.config.getoption("--keep-cluster-dirs"))):
            yield root
    except (_kind.KindUnavailableError, ToolMissingError) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kind_keycloak(kind_clusters: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keycloak]:
    """Keycloak on the host, issuer on the kind network's gateway (reachable from the hub Pod)."""
    yield from _gateway_keycloak(tmp_path_factory.mktemp("keycloak-kind"), _kind.kind_gateway())


def _gateway_keycloak(directory: Path, gateway: str) -> Iterator[Keycloak]:
    """Keycloak on the host with its issuer on ``gateway`` (a relay there), stopped after."""
    try:
        kc, relay = _kind.start_gateway_keycloak(directory, gateway)
    except (ToolMissingError, KeycloakError) as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield kc
    finally:
        kc.stop()
        relay.close()


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Node]:
    """The session's test node (see the module docstring); stopped at the end, leaving nothing."""
    try:
        started = start_node(tmp_path_factory.mktemp("node"))
    except (NodeUnavailableError, NodeError, ToolMissingError) as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield started
    finally:
        errors = started.stop(keep=bool(request.config.getoption("--keep-cluster-dirs")))
        if errors:
            logger.error("the node left something behind: %s", errors)


@pytest.fixture(scope="session")
def node_keycloak(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keycloak]:
    """Keycloak on the host, issuer on the host's end of the node's veth (reachable from Pods)."""
    yield from _gateway_keycloak(tmp_path_factory.mktemp("keycloak-node"), node.host_ip)


#: The clusters of ``otterscale_system`` with a control plane and an agent.
SYSTEM_CLUSTERS = ("east", "west")
#: Configured in ``otterscale_system`` but with no control plane and no agent: never connected.
SYSTEM_OFFLINE_CLUSTERS = ("south",)


@pytest.fixture(scope="session")
def otterscale_system(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    keycloak: Keycloak,
    control_plane_factory: ControlPlaneFactory,
) -> Iterator[System | _kind.KindSystem | _nodesystem.NodeSystem]:
    """Keycloak + control planes ``east`` and ``west`` + the hub + one agent each (see above)."""
    if provider(request.config) == "kind":
        yield from _kind_system(tmp_path_factory, request, keycloak)
        return
    if provider(request.config) == "node":
        yield from _node_system(tmp_path_factory, request, keycloak, control_plane_factory)
        return
    clusters: dict[str, ControlPlane | None] = {name: control_plane_factory(name) for name in SYSTEM_CLUSTERS}
    clusters.update(dict.fromkeys(SYSTEM_OFFLINE_CLUSTERS))
    started = time.monotonic()
    try:
        system = start_system(
            tmp_path_factory.mktemp("system"),
            clusters,
            realm_url=keycloak.realm_url,
            client_id=keycloak.client_id,
        )
    except ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    logger.info("system up in %.1fs: hub %s", time.monotonic() - started, system.hub_url)
    try:
        yield system
    finally:
        system.stop()
        if request.config.getoption("--keep-cluster-dirs"):
            logger.warning("hub and agent configuration and logs kept in %s", system.directory)


def _kind_system(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, keycloak: Keycloak
) -> Iterator[_kind.KindSystem]:
    root: Path = request.getfixturevalue("kind_clusters")
    try:
        helm = str(tool_path("helm"))
    except ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    system = _kind.start_kind_system(root, tmp_path_factory.mktemp("system-kind"), helm, keycloak.realm_url)
    try:
        yield system
    finally:
        system.stop()


def _node_system(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    keycloak: Keycloak,
    control_plane_factory: ControlPlaneFactory,
) -> Iterator[_nodesystem.NodeSystem]:
    node: Node = request.getfixturevalue("node")
    clusters: dict[str, ControlPlane | None] = {name: control_plane_factory(name) for name in SYSTEM_CLUSTERS}
    started = time.monotonic()
    try:
        installation, system = _nodesystem.start_node_system(
            node,
            tmp_path_factory.mktemp("system-node"),
            realm_url=keycloak.realm_url,
            clusters=clusters,
            offline=SYSTEM_OFFLINE_CLUSTERS,
        )
    except (ToolMissingError, NodeError) as exc:
        pytest.fail(str(exc), pytrace=False)
    logger.info("system up on the node in %.1fs: hub %s", time.monotonic() - started, system.hub_url)
    try:
        yield system
    finally:
        system.stop()
        try:
            installation.uninstall()
        finally:
            installation.close()
