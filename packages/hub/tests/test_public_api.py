"""The public surface of otterscale.hub is exactly the intended set of names (as in httpx)."""

from __future__ import annotations

import inspect
import pathlib

import otterscale.hub

EXPECTED = {"ElectionSettings", "Hub", "HubSettings", "hub_version", "main"}


def test_all_is_exactly_the_public_api() -> None:
    assert set(otterscale.hub.__all__) == EXPECTED
    for name in otterscale.hub.__all__:
        value = getattr(otterscale.hub, name)
        assert value.__module__.startswith("otterscale.hub._"), name
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__doc__, f"{name} has no docstring"


def test_hub_imports_neither_agent_nor_test_tools() -> None:
    src = pathlib.Path(otterscale.hub.__file__).parent
    for path in src.glob("*.py"):
        text = path.read_text()
        for forbidden in ("otterscale.agent", "otterscale.testing"):
            assert f"import {forbidden}" not in text, (path, forbidden)
            assert f"from {forbidden}" not in text, (path, forbidden)


def test_console_scripts_are_registered() -> None:
    import importlib.metadata

    dist = importlib.metadata.distribution("otterscale-hub")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    commands = {ep.name: ep.value for ep in dist.entry_points if ep.group == "otterscale.commands"}
    assert scripts == {"otterscale-hub": "otterscale.hub._cli:console_main"}
    assert commands == {"server": "otterscale.hub._cli:main"}
