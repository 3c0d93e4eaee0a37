"""Properties of configuration loading (hypothesis): whatever the bytes, ``load_config`` and
``parse_config`` give a configuration or a ConfigError whose problems each name a key path and
a reason; valid generated configurations load with every value intact; secrets never appear in
an error."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from otterscale.common import ConfigError, OtterscaleConfig, load_config, parse_config


def examples(count: int) -> settings:
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


SOURCE = "otterscale.yaml"

# Inputs that once escaped the loader as PyYAML's or Python's own exceptions: characters YAML
# forbids (raised while the loader was built) and explicitly tagged scalars SafeConstructor cannot
# build (``!!int x`` is a ValueError, ``!!bool x`` a KeyError, ``!!set [1]`` a TypeError).
FORMER_ESCAPES = {
    "NUL": "keycloak:\n  client_id: a\x00b\n",
    "C0 control": "keycloak:\n  client_id: a\x1fb\n",
    "DEL": "keycloak:\n  client_id: a\x7fb\n",
    "U+FFFE": "keycloak:\n  client_id: a\ufffeb\n",
    "lone surrogate": "keycloak:\n  client_id: a\ud800b\n",
    "empty !!int": 'tunnel:\n  server:\n    port: !!int ""\n',
    "!!int x": "tunnel:\n  server:\n    port: !!int x\n",
    "!!float x": "keycloak:\n  leeway_seconds: !!float x\n",
    "bad !!timestamp date": "keycloak:\n  client_id: !!timestamp 2024-13-45\n",
    "!!timestamp x": "keycloak:\n  client_id: !!timestamp x\n",
    "!!bool x": "keycloak:\n  client_id: !!bool x\n",
    "!!set of a scalar": "keycloak:\n  client_id: !!set [1]\n",
    "5000-digit port": "tunnel:\n  server:\n    port: " + "9" * 5000 + "\n",
}


def _parse(text: str, **kwargs: Any) -> tuple[OtterscaleConfig | None, ConfigError | None]:
    """The configuration, or the ConfigError; any other exception propagates (and fails the test)."""
    try:
        return parse_config(text, SOURCE, **kwargs), None
    except ConfigError as exc:
        return None, exc


def _check_error(error: ConfigError, source: str = SOURCE) -> None:
    assert error.problems, "a ConfigError without problems"
    for path, reason in error.problems:
        assert isinstance(path, str)
        assert isinstance(reason, str)
        assert reason
        assert "Traceback" not in reason
    assert str(error).startswith(source)


# --------------------------------------------------------------------------------------------------
# Valid configurations

_dns_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
# "§" occurs in no other generated value (users, fingerprints, names, URLs), so finding a secret
# in an error can only mean the secret was echoed.
# Secrets must be at least 32 characters (MIN_SECRET_LENGTH); the "§" keeps them from being a
# YAML special value.
_secret = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=31, max_size=60).map(
    lambda s: "§" + s
)
_user = st.from_regex(r"[A-Za-z0-9._@-]{1,20}", fullmatch=True)
_host = st.sampled_from(["0.0.0.0", "127.0.0.1", "::", "hub.example.com", "localhost"])  # noqa: S104


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(_dns_label, min_size=1, max_size=5, unique=True))
    ports = draw(
        st.lists(st.integers(1, 65535), min_size=len(names) + 1, max_size=len(names) + 1, unique=True)
    )
    users = draw(st.lists(_user, min_size=len(names), max_size=len(names), unique=True))
    quote = draw(st.booleans())  # ports as ints or as quoted strings, as the original format allows

    def port(value: int) -> int | str:
        return str(value) if quote else value

    keycloak: dict[str, Any] = {
        "realm_url": draw(
            st.sampled_from(["https://sso.example.com/realms/", "http://127.0.0.1:8080/realms/"])
        )
        + draw(_dns_label),
        "client_id": draw(_user),
    }
    if draw(st.booleans()):
        keycloak["audience"] = draw(_user)
    if draw(st.booleans()):
        keycloak["leeway_seconds"] = draw(st.integers(0, 300))
    clusters = {}
    for name, tunnel_port, user in zip(names, ports[1:], users, strict=True):
        agent: dict[str, Any] = {
            "auth": {"user": user, "pass": draw(_secret)},
            "tunnel_port": port(tunnel_port),
            "api_port": port(draw(st.integers(1, 65535))),
        }
        if draw(st.booleans()):
            agent["fingerprint"] = draw(st.from_regex(r"[A-Za-z0-9+/=]{10,60}", fullmatch=True))
        clusters[name] = {"agent": agent}
    return {
        "keycloak": keycloak,
        "tunnel": {"server": {"host": draw(_host), "port": port(ports[0]), "key_seed": draw(_secret)}},
        "clusters": clusters,
    }


@examples(150)
@given(document=valid_documents(), flow=st.booleans())
def test_valid_configurations_load_with_every_value(document: dict[str, Any], flow: bool) -> None:
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True, sort_keys=False)
    config, error = _parse(text)
    assert error is None, error.problems
    assert config is not None
    assert config.keycloak.realm_url == document["keycloak"]["realm_url"]
    assert config.keycloak.expected_audience == document["keycloak"].get(
        "audience", document["keycloak"]["client_id"]
    )
    server = document["tunnel"]["server"]
    assert config.tunnel.server.port == int(server["port"])
    assert config.tunnel.server.key_seed is not None
    assert config.tunnel.server.key_seed.get_secret_value() == server["key_seed"]
    assert set(config.clusters) == set(document["clusters"])
    for name, cluster in document["clusters"].items():
        agent, loaded = cluster["agent"], config.clusters[name].agent
        assert loaded.auth.user == agent["auth"]["user"]
        assert loaded.auth.password.get_secret_value() == agent["auth"]["pass"]
        assert loaded.tunnel_port == int(agent["tunnel_port"])
        assert loaded.api_port == int(agent["api_port"])
        assert loaded.fingerprint == agent.get("fingerprint")
    for secret in _secrets(document):
        assert secret not in repr(config)


def _secrets(document: dict[str, Any]) -> list[str]:
    found = [document["tunnel"]["server"]["key_seed"]]
    found += [c["agent"]["auth"]["pass"] for c in document["clusters"].values()]
    return found


# --------------------------------------------------------------------------------------------------
# Broken configurations

_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, str(key)))
    return found


def _at(document: dict[str, Any], path: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    parent: Any = document
    for key in path[:-1]:
        parent = parent[key]
    return parent, path[-1]


@examples(300)
@given(document=valid_documents(), data=st.data())
def test_a_broken_value_is_reported_at_its_key(document: dict[str, Any], data: st.DataObject) -> None:
    """Delete a key, or replace a value with junk: the result loads, or the error names that key
    (or, for a changed port or user, the clash it causes); a secret never appears in the error."""
    broken = copy.deepcopy(document)
    path = data.draw(st.sampled_from(_paths(broken)), label="path")
    parent, key = _at(broken, path)
    action = data.draw(st.sampled_from(["delete", "replace", "add"]), label="action")
    drawn: Any = None
    if action == "delete":
        del parent[key]
    elif action == "replace":
        parent[key] = drawn = data.draw(_junk, label="value")
    else:
        target = parent[key]
        assume(isinstance(target, dict))
        extra = data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in target), label="new key")
        target[extra] = data.draw(_junk, label="value")
        drawn = (extra, target[extra])
    # Hypothesis may reuse a drawn string: junk equal to a secret is not a leak when echoed.
    assume(not any(secret in repr(drawn) for secret in _secrets(document)))
    config, error = _parse(yaml.safe_dump(broken, allow_unicode=True))
    if error is None:
        assert config is not None
        return
    _check_error(error)
    dotted = ".".join(path)
    related = [
        p
        for p, _ in error.problems
        if p == dotted or p.startswith(dotted + ".") or dotted.startswith(p + ".") or p == ""
    ]
    clash = [p for p, reason in error.problems if "also" in reason or "give exactly one" in reason]
    assert related or clash, (dotted, error.problems)
    text = str(error) + repr(error.problems)
    for secret in _secrets(document):
        assert secret not in text, "a secret in a configuration error"


@examples(400)
@given(text=st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_gives_a_config_or_a_config_error(text: str) -> None:
    config, error = _parse(text)
    if error is not None:
        _check_error(error)
    else:
        assert isinstance(config, OtterscaleConfig)


_YAML_TOKENS = [
    "keycloak:", "tunnel:", "server:", "clusters:", "agent:", "auth:", "user: u", "pass: p", "port: 1",
    "tunnel_port: 2", "api_port: 3", "key_seed: s", "key_file: /nonexistent", "realm_url: http://k/r",
    "client_id: c", "dev:", "\n", "  ", "    ", "- ", "&a ", "*a", "<<: *a", "!!python/name:os.system",
    "!!binary", "!!str", "!!null", "!!map", "!!seq",
    "!!int", "!!float", "!!bool", "!!timestamp", "!!set",
    "{", "}", "[", "]", ",", ": ", "? ", "'", '"', "\\x00",
    "---", "...", "%YAML 1.1", "yes", "on", "~", ".inf", ".nan", "0x10", "0o7", "1_0", "1e400",
    "99999999999999999999", "2024-01-01", "\ufeff", "\x85", "\u2028", "\t", "#",
]  # fmt: skip


@examples(600)
@given(parts=st.lists(st.sampled_from(_YAML_TOKENS) | st.text(max_size=3), max_size=50))
def test_yaml_shaped_garbage_gives_a_config_or_a_config_error(parts: list[str]) -> None:
    for require_tunnel_key in (True, False):
        config, error = _parse("".join(parts), require_tunnel_key=require_tunnel_key)
        if error is not None:
            _check_error(error)
        else:
            assert isinstance(config, OtterscaleConfig)


@examples(150)
@given(raw=st.binary(max_size=600), document=valid_documents())
def test_any_file_content_gives_a_config_or_a_config_error(
    raw: bytes, document: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "otterscale.yaml"
    for content in (raw, yaml.safe_dump(document).encode() + raw, b"\xef\xbb\xbf" + raw):
        path.write_bytes(content)
        try:
            config = load_config(path, require_tunnel_key=False)
        except ConfigError as exc:
            _check_error(exc, str(path))
        else:
            assert isinstance(config, OtterscaleConfig)


@pytest.mark.parametrize("depth", [10, 49, 51, 1000, 100_000])
def test_nesting_gives_a_config_or_a_config_error(depth: int) -> None:
    for text in (
        "[" * depth + "]" * depth,
        "a:\n" + "".join(" " * i + "b:\n" for i in range(1, min(depth, 3000))),
    ):
        config, error = _parse(text)
        assert config is None
        assert error is not None
        _check_error(error)


@pytest.mark.parametrize("case", list(FORMER_ESCAPES))
def test_forbidden_characters_and_unbuildable_tags_are_config_errors(case: str) -> None:
    config, error = _parse(FORMER_ESCAPES[case])
    assert config is None
    assert error is not None
    _check_error(error)
