"""Static checks of the charts (no helm, no cluster): versions, the shared merge script, and the
values schema kept in step with the services' configuration models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from otterscale.common import (
    AccessConfig,
    AccessRule,
    AgentAuth,
    AgentConfig,
    AuditConfig,
    ClusterConfig,
    CorsConfig,
    FanoutConfig,
    HubLimitsConfig,
    KeycloakConfig,
    OtterscaleConfig,
    RuntimeConfig,
    TunnelServerConfig,
)

ROOT = Path(__file__).resolve().parents[2]
CHARTS = {"otterscale-hub": "hub", "otterscale-agent": "agent"}
SECRET_KEYS = {"key_seed", "key_file", "pass"}


@pytest.mark.parametrize(("chart", "package"), CHARTS.items())
def test_chart_version_is_the_package_version(chart: str, package: str) -> None:
    meta = yaml.safe_load((ROOT / "charts" / chart / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
    assert meta["name"] == project["name"]
    assert meta["version"] == project["version"], (
        "bump Chart.yaml version with the package (README: Releasing)"
    )
    assert meta["appVersion"] == project["version"], "appVersion is the package version the image ships"


def test_both_charts_ship_the_same_merge_script() -> None:
    hub, agent = (ROOT / "charts" / chart / "files" / "merge-config.py" for chart in CHARTS)
    assert hub.read_bytes() == agent.read_bytes()


def _aliases(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


def test_hub_schema_knows_exactly_the_configuration_keys() -> None:
    """values.schema.json refuses unknown config keys; it must accept every key the hub knows."""
    schema = json.loads((ROOT / "charts" / "otterscale-hub" / "values.schema.json").read_text())
    config = schema["properties"]["config"]
    props = config["properties"]
    # runtime is the agents' section: the hub ignores it, so its chart does not offer it.
    assert set(props) == _aliases(OtterscaleConfig) - {"runtime"}
    optional = {"limits", "audit", "cors", "fanout", "access", "runtime"}
    assert set(config["required"]) == _aliases(OtterscaleConfig) - optional
    assert set(props["limits"]["properties"]) == _aliases(HubLimitsConfig)
    assert set(props["audit"]["properties"]) == _aliases(AuditConfig)
    assert set(props["cors"]["properties"]) == _aliases(CorsConfig)
    # The token keys are secret: secrets.fanoutTokenKey / fanoutPreviousTokenKeys.
    assert set(props["fanout"]["properties"]) == _aliases(FanoutConfig) - {"token_key", "previous_token_keys"}
    assert set(props["access"]["properties"]) == _aliases(AccessConfig)
    assert set(props["access"]["properties"]["rules"]["items"]["properties"]) == _aliases(AccessRule)
    assert set(props["clusters"]["additionalProperties"]["properties"]) == _aliases(ClusterConfig)
    assert set(props["keycloak"]["properties"]) == _aliases(KeycloakConfig)
    assert (
        set(props["tunnel"]["properties"]["server"]["properties"])
        == _aliases(TunnelServerConfig) - SECRET_KEYS
    )
    agent = props["clusters"]["additionalProperties"]["properties"]["agent"]
    assert set(agent["properties"]) == _aliases(AgentConfig)
    assert set(agent["properties"]["auth"]["properties"]) == _aliases(AgentAuth) - SECRET_KEYS


def test_agent_schema_knows_exactly_the_agent_keys() -> None:
    schema = json.loads((ROOT / "charts" / "otterscale-agent" / "values.schema.json").read_text())
    props = schema["properties"]["config"]["properties"]
    assert set(props["agent"]["properties"]) == _aliases(AgentConfig)
    assert set(props["agent"]["properties"]["auth"]["properties"]) == _aliases(AgentAuth) - SECRET_KEYS
    assert set(props["keycloak"]["properties"]) == _aliases(KeycloakConfig)
    assert set(props["runtime"]["properties"]) == _aliases(RuntimeConfig)
    assert set(props["audit"]["properties"]) == _aliases(AuditConfig)


@pytest.mark.parametrize("chart", CHARTS)
def test_default_values_match_the_schema(chart: str) -> None:
    schema = json.loads((ROOT / "charts" / chart / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((ROOT / "charts" / chart / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for values in sorted((ROOT / "charts" / chart / "ci").glob("*.yaml")):
        jsonschema.validate(_coalesce(defaults, yaml.safe_load(values.read_text())), schema)


@pytest.mark.parametrize(
    ("cors", "valid"),
    [
        ({"allowed_origins": ["https://dashboard.example.com", "http://127.0.0.1:5173"]}, True),
        ({"allowed_origins": ["https://*.example.com"], "allow_credentials": True}, True),
        ({"allowed_origins": ["*"]}, True),
        ({"allowed_origins": ["*"], "allow_credentials": True}, False),  # refused by the hub too
        ({"allowed_origins": ["https://dashboard.example.com/"]}, False),  # a path
        ({"allowed_origins": ["dashboard.example.com"]}, False),  # no scheme
        ({"allowed_origins": ["https://a.*.example.com"]}, False),
        ({"extra_allowed_headers": ["X Tenant"]}, False),
        ({"allowed_origin": ["https://dashboard.example.com"]}, False),  # a typo
    ],
)
def test_hub_schema_checks_cors_like_the_hub(cors: dict[str, Any], valid: bool) -> None:
    """helm install refuses what the hub would refuse at start-up, before any Pod starts."""
    chart = ROOT / "charts" / "otterscale-hub"
    schema = json.loads((chart / "values.schema.json").read_text())
    values = _coalesce(
        yaml.safe_load((chart / "values.yaml").read_text()),
        yaml.safe_load((chart / "ci" / "default-values.yaml").read_text()),
    )
    values["config"]["cors"] = cors
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(values))
    assert not errors if valid else errors


def _coalesce(defaults: Any, override: Any) -> Any:
    """Helm's merge of a values file over the chart's defaults (mappings merge, the rest replaces)."""
    if isinstance(defaults, dict) and isinstance(override, dict):
        merged = dict(defaults)
        for key, value in override.items():
            merged[key] = _coalesce(defaults.get(key), value)
        return merged
    return override


# --------------------------------------------------------------------------------------------------
# merge-config.py (the init container's script)


def _merge_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "merge_config", ROOT / "charts/otterscale-hub/files/merge-config.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ inside the chart
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


def test_merge_is_deep_and_the_secret_wins() -> None:
    merge = _merge_module().merge
    base: dict[str, Any] = {
        "tunnel": {"server": {"host": "::", "port": 8300}},
        "clusters": {
            "a": {"agent": {"auth": {"user": "u"}, "tunnel_port": 1}},
            "b": {"agent": {"auth": {"user": "v"}}},
        },
    }
    overlay = {"tunnel": {"server": {"key_seed": "s"}}, "clusters": {"a": {"agent": {"auth": {"pass": "p"}}}}}
    taken = merge(base, overlay)
    assert taken == ["tunnel.server.key_seed", "clusters.a.agent.auth.pass"]
    assert base["tunnel"]["server"] == {"host": "::", "port": 8300, "key_seed": "s"}
    assert base["clusters"]["a"]["agent"] == {"auth": {"user": "u", "pass": "p"}, "tunnel_port": 1}
    assert base["clusters"]["b"] == {"agent": {"auth": {"user": "v"}}}
    assert merge(base, {"tunnel": "x"}) == ["tunnel"]
    assert base["tunnel"] == "x"


def _run(tmp_path: Path, base: str, secret: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "base.yaml").write_text(base)
    if secret is not None:
        (tmp_path / "secret.yaml").write_text(secret)
    script = ROOT / "charts/otterscale-hub/files/merge-config.py"
    argv = [str(tmp_path / name) for name in ("base.yaml", "secret.yaml", "out.yaml")]
    return subprocess.run(
        [sys.executable, "-I", str(script), *argv], capture_output=True, text=True, check=False
    )


def test_merge_script_never_prints_values(tmp_path: Path) -> None:
    result = _run(tmp_path, "a: {b: 1}\n", "a: {c: hunter2}\n")
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "a.c" in result.stdout
    assert yaml.safe_load((tmp_path / "out.yaml").read_text()) == {"a": {"b": 1, "c": "hunter2"}}
    assert (tmp_path / "out.yaml").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (None, "cannot read the secret configuration"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("a: [unclosed\n  pass: hunter2\n", "not valid YAML (line"),
    ],
)
def test_merge_script_fails_clearly(tmp_path: Path, secret: str | None, message: str) -> None:
    result = _run(tmp_path, "a: 1\n", secret)
    assert result.returncode != 0
    assert message in result.stderr
    assert "hunter2" not in result.stderr
    assert not (tmp_path / "out.yaml").exists()
