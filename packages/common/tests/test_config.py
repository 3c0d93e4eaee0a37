"""otterscale.yaml: the original format loads unchanged, and every mistake is reported usefully."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr, ValidationError

from otterscale.common import (
    MAX_CONFIG_BYTES,
    AgentAuth,
    AgentConfig,
    ClusterConfig,
    ConfigError,
    KeycloakConfig,
    OtterscaleConfig,
    OtterscaleError,
    TunnelConfig,
    TunnelServerConfig,
    load_config,
    parse_config,
)
from otterscale.testing.images import SAMPLE_CONFIG

# The original's example secrets are refused now (too short, and published); the tests use these.
DEV_PASSWORD = "dev-agent-password-5d0b9f1c2e7a4b3d"
SEED = "tunnel-key-seed-8c1f0e9d7b6a5c4d3e2f"
PROD_PASSWORD = "prod-password-3e5a7c9b1d2f4a6c8e0b"
# The minimal configuration from the original service's README, comments and all.
GO_EXAMPLE = SAMPLE_CONFIG
ORIGINAL = GO_EXAMPLE.replace('"change-me"', f'"{SEED}"').replace('"dev-agent-password"', f'"{DEV_PASSWORD}"')

SECRETS = (DEV_PASSWORD, SEED, PROD_PASSWORD, "s3cr3t-seed")


def document(**changes: Any) -> dict[str, Any]:
    """The original configuration as data, with dotted-path changes (None deletes)."""
    data: dict[str, Any] = yaml.safe_load(ORIGINAL)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return data


def problems_of(data: object, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(data, sort_keys=False), "otterscale.yaml", **kwargs)
    return caught.value


def assert_problem(error: ConfigError, path: str, fragment: str) -> None:
    assert any(p == path and fragment in reason for p, reason in error.problems), error.problems
    assert f"otterscale.yaml: {path}: " in str(error)


def second_cluster(
    name: str = "prod", *, user: str = "prod-agent", tunnel_port: Any = 51002
) -> dict[str, Any]:
    return {
        "agent": {
            "auth": {"user": user, "pass": PROD_PASSWORD},
            "fingerprint": "abc",
            "tunnel_port": tunnel_port,
            "api_port": 8299,
        }
    }


# --------------------------------------------------------------------------------------------------
# The original format


def test_original_configuration_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "otterscale.yaml"
    path.write_text(ORIGINAL)
    config = load_config(path)
    assert config.keycloak.realm_url == "https://keycloak.example.com/realms/otterscale"
    assert config.keycloak.client_id == "otterscale"
    assert config.keycloak.expected_audience == "otterscale"
    assert config.keycloak.subject_claim == "sub"
    assert config.keycloak.groups_claim == "groups"
    assert config.keycloak.groups_prefix == ""
    assert config.keycloak.leeway_seconds == 30
    assert config.tunnel.server.host == "0.0.0.0"  # noqa: S104
    assert config.tunnel.server.port == 8300
    assert config.tunnel.server.key_seed is not None
    assert config.tunnel.server.key_seed.get_secret_value() == SEED
    assert config.tunnel.server.key_file is None
    agent = config.clusters["dev"].agent
    assert agent.auth.user == "dev-agent"
    assert agent.auth.password.get_secret_value() == DEV_PASSWORD
    assert agent.fingerprint == "SERVER_TUNNEL_FINGERPRINT"
    assert agent.tunnel_port == 51001
    assert agent.api_port == 8299


def test_load_config_accepts_a_string_path(tmp_path: Path) -> None:
    path = tmp_path / "otterscale.yaml"
    path.write_text(ORIGINAL)
    assert load_config(str(path)).clusters["dev"].agent.api_port == 8299


def test_ports_may_be_ints_or_quoted_strings() -> None:
    data = document(tunnel__server__port=8300)
    data["clusters"]["dev"]["agent"].update(tunnel_port="51001", api_port="8299")
    config = parse_config(yaml.safe_dump(data), "x")
    assert config.tunnel.server.port == 8300
    assert config.clusters["dev"].agent.tunnel_port == 51001
    assert config.clusters["dev"].agent.api_port == 8299


def test_new_optional_keycloak_keys() -> None:
    data = document(
        keycloak__audience="api",
        keycloak__subject_claim="preferred_username",
        keycloak__groups_claim="realm_access.roles",
        keycloak__groups_prefix="oidc:",
        keycloak__leeway_seconds=5,
        keycloak__timeout_seconds=2.5,
        keycloak__min_refresh_interval_seconds=60,
    )
    keycloak = parse_config(yaml.safe_dump(data), "x").keycloak
    assert keycloak.expected_audience == "api"
    assert keycloak.client_id == "otterscale"
    assert (keycloak.subject_claim, keycloak.groups_claim, keycloak.groups_prefix) == (
        "preferred_username",
        "realm_access.roles",
        "oidc:",
    )
    assert (keycloak.leeway_seconds, keycloak.timeout_seconds, keycloak.min_refresh_interval_seconds) == (
        5,
        2.5,
        60,
    )


def test_key_file_instead_of_key_seed(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN EC PRIVATE KEY-----\n")
    config = parse_config(
        yaml.safe_dump(document(tunnel__server__key_seed=None, tunnel__server__key_file=str(key))), "x"
    )
    assert config.tunnel.server.key_file == key
    assert config.tunnel.server.key_seed is None


def test_agents_need_no_tunnel_key() -> None:
    data = document(tunnel__server__key_seed=None)
    config = parse_config(yaml.safe_dump(data), "x", require_tunnel_key=False)
    assert config.tunnel.server.key_seed is None
    assert config.tunnel.server.key_file is None
    # ... and do not check a key file they will never read.
    data = document(tunnel__server__key_seed=None, tunnel__server__key_file="/nonexistent/key.pem")
    assert parse_config(yaml.safe_dump(data), "x", require_tunnel_key=False).tunnel.server.key_file


def test_fingerprint_is_optional_until_the_server_printed_it() -> None:
    data = document()
    del data["clusters"]["dev"]["agent"]["fingerprint"]
    assert parse_config(yaml.safe_dump(data), "x").clusters["dev"].agent.fingerprint is None


def test_several_clusters() -> None:
    data = document()
    data["clusters"]["prod"] = second_cluster()
    data["clusters"]["a"] = second_cluster(user="a", tunnel_port=51003)
    assert sorted(parse_config(yaml.safe_dump(data), "x").clusters) == ["a", "dev", "prod"]


def test_yaml_anchors_within_limits_are_fine() -> None:
    text = ORIGINAL.replace("api_port: 8299", "api_port: &api 8299") + (
        "  prod:\n"
        "    agent:\n"
        f"      auth: {{user: prod-agent, pass: {PROD_PASSWORD}}}\n"
        "      tunnel_port: 51002\n"
        "      api_port: *api\n"
    )
    assert parse_config(text, "x").clusters["prod"].agent.api_port == 8299


# --------------------------------------------------------------------------------------------------
# Secrets stay secret


def test_repr_and_str_hide_secrets() -> None:
    config = parse_config(ORIGINAL, "x")
    for text in (repr(config), str(config), repr(config.clusters["dev"]), repr(config.tunnel.server)):
        for secret in SECRETS:
            assert secret not in text
    assert "**********" in repr(config.clusters["dev"].agent.auth)


@pytest.mark.parametrize(
    "changes",
    [
        {"tunnel__server__key_seed": ["s3cr3t-seed"]},
        {"tunnel__server__key_seed": {"nested": "s3cr3t-seed"}},
        {"tunnel__server__port": "s3cr3t-seed"},
        {"clusters__dev__agent__auth__pass": [DEV_PASSWORD]},
        {"clusters__dev__agent__auth__pass": {DEV_PASSWORD: 1}},
        {"clusters__dev__agent__auth__pass": 12345},
        {"clusters__dev__agent__auth__password": DEV_PASSWORD},
    ],
)
def test_errors_never_echo_secret_values(changes: dict[str, Any]) -> None:
    error = problems_of(document(**changes))
    text = str(error) + repr(error.problems)
    for secret in (*SECRETS, "12345"):
        assert secret not in text


def test_yaml_syntax_errors_do_not_quote_the_line() -> None:
    text = ORIGINAL.replace(f'pass: "{DEV_PASSWORD}"', f'pass: "{DEV_PASSWORD}')
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "otterscale.yaml")
    assert DEV_PASSWORD not in str(caught.value)
    assert "not valid YAML: line" in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Problems a person can act on


def test_config_error_is_an_otterscale_error() -> None:
    assert issubclass(ConfigError, OtterscaleError)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing\.yaml: configuration file not found") as caught:
        load_config(path)
    assert caught.value.source == str(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        load_config(path)
    with pytest.raises(ConfigError, match="larger than"):
        parse_config("#" * (MAX_CONFIG_BYTES + 1), "x")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"keycloak:\n  client_id: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(invalid byte at offset 26\)"):
        load_config(path)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + ORIGINAL.encode())
    assert load_config(path).keycloak.client_id == "otterscale"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("keycloak: [", "not valid YAML: line 1, column 12"),
        ("keycloak:\n  realm_url: x\n client_id: y\n", "not valid YAML: line 3"),
        ("a: b\n\tc: d\n", "not valid YAML: line 2"),
        ("---\na: 1\n---\nb: 2\n", "expected a single document"),
        ("a: !!python/object/apply:os.system [ls]\n", "could not determine a constructor"),
        ("a: *undefined\n", "undefined alias"),
    ],
)
def test_not_yaml(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=r"^x: not valid YAML") as caught:
        parse_config(text, "x")
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "configuration is empty"),
        ("# only a comment\n", "configuration is empty"),
        ("- keycloak\n- tunnel\n", "must be a mapping with keys keycloak, tunnel and clusters, not a list"),
        ("just text\n", "not a string"),
        ("42\n", "not an integer"),
    ],
)
def test_not_a_mapping(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_config(text, "x")


def test_duplicate_yaml_keys_are_refused() -> None:
    text = ORIGINAL + "  dev:\n    agent: {}\n"
    with pytest.raises(
        ConfigError, match=r"line 30, column 3: while constructing a mapping: found duplicate key 'dev'"
    ):
        parse_config(text, "x")


def test_merge_keys_may_be_overridden_without_a_duplicate_error() -> None:
    text = ORIGINAL.replace("  dev:\n    agent:\n", "  dev:\n    agent: &base\n") + textwrap.indent(
        textwrap.dedent(
            """\
            prod:
              agent:
                <<: *base
                auth: {user: prod-agent, pass: PROD_PASSWORD}
                tunnel_port: 51002
            """
        ).replace("PROD_PASSWORD", PROD_PASSWORD),
        "  ",
    )
    config = parse_config(text, "x")
    assert config.clusters["prod"].agent.tunnel_port == 51002
    assert config.clusters["prod"].agent.fingerprint == "SERVER_TUNNEL_FINGERPRINT"


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ['a0: ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 9)}]")
    lines[0] = 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"expands \(through aliases\) to more than 100000 nodes"):
        parse_config("\n".join(lines) + "\n", "bomb.yaml")
    assert time.monotonic() - started < 5


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(ConfigError, match="recursive alias"):
        parse_config("a: &a [*a]\n", "x")


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(ConfigError, match="nested deeper than 50 levels"):
        parse_config("a: " + "[" * 60 + "]" * 60 + "\n", "x")
    with pytest.raises(ConfigError, match="nested deeper than 50 levels"):
        parse_config("a: " + "[" * 5000 + "]" * 5000 + "\n", "x")


def test_missing_key_seed_and_key_file() -> None:
    error = problems_of(document(tunnel__server__key_seed=None))
    assert_problem(error, "tunnel.server", "needs key_seed or key_file")


def test_both_key_seed_and_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    error = problems_of(document(tunnel__server__key_file=str(key)))
    assert_problem(error, "tunnel.server", "exactly one of key_seed or key_file, not both")
    # Refused for agents too: it is ambiguous wherever it is read.
    error = problems_of(document(tunnel__server__key_file=str(key)), require_tunnel_key=False)
    assert_problem(error, "tunnel.server", "not both")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda tmp: tmp / "absent.pem", "does not exist"),
        (lambda tmp: tmp, "is a directory"),
    ],
)
def test_unreadable_key_file(tmp_path: Path, make: Any, fragment: str) -> None:
    path = make(tmp_path)
    error = problems_of(document(tunnel__server__key_seed=None, tunnel__server__key_file=str(path)))
    assert_problem(error, "tunnel.server.key_file", fragment)
    assert str(path) in str(error)


def test_empty_key_seed_and_key_file() -> None:
    assert_problem(
        problems_of(document(tunnel__server__key_seed="")), "tunnel.server.key_seed", "must not be empty"
    )
    error = problems_of(document(tunnel__server__key_seed=None, tunnel__server__key_file=""))
    assert_problem(error, "tunnel.server.key_file", "must be a file path")


def test_duplicate_tunnel_port_names_both_clusters() -> None:
    data = document()
    data["clusters"]["prod"] = second_cluster(tunnel_port="51001")
    error = problems_of(data)
    assert_problem(
        error, "clusters.prod.agent.tunnel_port", "port 51001 is also the tunnel_port of cluster 'dev'"
    )


def test_tunnel_port_must_differ_from_the_tunnel_server_port() -> None:
    data = document()
    data["clusters"]["dev"]["agent"]["tunnel_port"] = 8300
    assert_problem(problems_of(data), "clusters.dev.agent.tunnel_port", "also tunnel.server.port")


def test_duplicate_agent_user_names_both_clusters() -> None:
    data = document()
    data["clusters"]["prod"] = second_cluster(user="dev-agent")
    error = problems_of(data)
    assert_problem(
        error, "clusters.prod.agent.auth.user", "user 'dev-agent' is also the agent user of cluster 'dev'"
    )


@pytest.mark.parametrize("port", [0, 65536, -1, "70000", "0"])
def test_port_out_of_range(port: Any) -> None:
    data = document()
    data["clusters"]["dev"]["agent"]["tunnel_port"] = port
    error = problems_of(data)
    assert_problem(error, "clusters.dev.agent.tunnel_port", "between 1 and 65535")


@pytest.mark.parametrize("port", ["http", "80.5", 80.0, True, [80], "", {}])
def test_port_not_a_number(port: Any) -> None:
    data = document(tunnel__server__port=port)
    error = problems_of(data)
    assert_problem(error, "tunnel.server.port", "must be a port number")


@pytest.mark.parametrize(
    "name", ["Dev", "dev_1", "dev.example", "-dev", "dev-", "a" * 64, "dév", "dev cluster", "a/b"]
)
def test_cluster_names_that_break_urls_or_regexes(name: str) -> None:
    data = document()
    data["clusters"][name] = second_cluster()
    error = problems_of(data)
    assert_problem(error, f"clusters.{name}", "cluster name must be a DNS label")


@pytest.mark.parametrize("name", ["a", "dev", "prod-eu-1", "0", "a" * 63])
def test_good_cluster_names(name: str) -> None:
    data = document()
    data["clusters"][name] = second_cluster()
    assert name in parse_config(yaml.safe_dump(data), "x").clusters


@pytest.mark.parametrize(
    ("name", "shown", "kind"), [("on", "True", "a boolean"), ("123", "123", "an integer")]
)
def test_cluster_names_yaml_reads_as_other_types_are_refused(name: str, shown: str, kind: str) -> None:
    text = ORIGINAL.replace("  dev:\n", f"  {name}:\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "x")
    assert str(caught.value) == (
        f"x: clusters.{shown}: cluster name must be a string, not {kind}; quote it "
        "(YAML reads on, off, yes, no and numbers as other types)"
    )


def test_unknown_keys_are_refused_everywhere() -> None:
    data = document(extra=1, keycloak__realm="x", tunnel__client={}, tunnel__server__keyseed="x")
    data["clusters"]["dev"]["agent"]["tunel_port"] = 1
    data["clusters"]["dev"]["agent"]["auth"]["password"] = DEV_PASSWORD
    data["clusters"]["dev"]["extra"] = True
    error = problems_of(data)
    assert_problem(error, "extra", "unknown key; allowed keys: keycloak, tunnel, clusters")
    assert_problem(error, "keycloak.realm", "did you mean realm_url?")
    assert_problem(error, "tunnel.client", "allowed keys: server")
    assert_problem(error, "tunnel.server.keyseed", "did you mean key_seed?")
    assert_problem(error, "clusters.dev.agent.tunel_port", "did you mean tunnel_port?")
    assert_problem(error, "clusters.dev.agent.auth.password", "allowed keys: user, pass")
    assert_problem(error, "clusters.dev.extra", "allowed keys: agent")


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("keycloak", "is required"),
        ("tunnel", "is required"),
        ("clusters", "is required"),
        ("keycloak.realm_url", "is required"),
        ("keycloak.client_id", "is required"),
        ("tunnel.server", "is required"),
        ("tunnel.server.host", "is required"),
        ("tunnel.server.port", "is required"),
        ("clusters.dev.agent", "is required"),
        ("clusters.dev.agent.auth", "is required"),
        ("clusters.dev.agent.auth.user", "is required"),
        ("clusters.dev.agent.auth.pass", "is required"),
        ("clusters.dev.agent.tunnel_port", "is required"),
        ("clusters.dev.agent.api_port", "is required"),
    ],
)
def test_missing_keys(path: str, fragment: str) -> None:
    error = problems_of(document(**{path.replace(".", "__"): None}))
    assert_problem(error, path, fragment)


@pytest.mark.parametrize(
    ("changes", "path", "fragment"),
    [
        ({"keycloak__realm_url": "keycloak.example.com"}, "keycloak.realm_url", "http(s) URL"),
        (
            {"keycloak__realm_url": "https://u:p@kc.example.com/realms/x"},
            "keycloak.realm_url",
            "without user info",
        ),
        ({"keycloak__realm_url": "https://kc.example.com/realms/x?a=b"}, "keycloak.realm_url", "query"),
        ({"keycloak__client_id": ""}, "keycloak.client_id", "must not be empty"),
        ({"keycloak__client_id": 42}, "keycloak.client_id", "must be a string"),
        ({"keycloak__groups_prefix": "system:oidc:"}, "keycloak.groups_prefix", "reserved prefix"),
        ({"keycloak__leeway_seconds": -1}, "keycloak.leeway_seconds", "greater than or equal to 0"),
        ({"keycloak__leeway_seconds": "soon"}, "keycloak.leeway_seconds", "must be a number"),
        ({"keycloak__timeout_seconds": 0}, "keycloak.timeout_seconds", "greater than 0"),
        ({"keycloak": "https://kc"}, "keycloak", "must be a mapping"),
        ({"clusters": ["dev"]}, "clusters", "must be a mapping"),
        ({"tunnel__server__host": ""}, "tunnel.server.host", "must not be empty"),
        (
            {"clusters__dev__agent__auth__user": "dev:agent"},
            "clusters.dev.agent.auth.user",
            "must not contain ':'",
        ),
        (
            {"clusters__dev__agent__auth__user": "dev agent"},
            "clusters.dev.agent.auth.user",
            "must not contain",
        ),
        ({"clusters__dev__agent__auth__pass": ""}, "clusters.dev.agent.auth.pass", "must not be empty"),
        ({"clusters__dev__agent__fingerprint": ""}, "clusters.dev.agent.fingerprint", "must not be empty"),
        ({"clusters__dev": None}, "clusters.dev", "is required"),
    ],
)
def test_bad_values(changes: dict[str, Any], path: str, fragment: str) -> None:
    data = document(**changes) if "clusters__dev" not in changes else document(clusters={"dev": None})
    error = problems_of(data)
    if "clusters__dev" in changes:
        assert_problem(error, "clusters.dev", "must be a mapping")
    else:
        assert_problem(error, path, fragment)


def test_all_problems_are_reported_at_once_one_line_each() -> None:
    data = document(tunnel__server__key_seed=None, keycloak__client_id="")
    data["clusters"]["dev"]["agent"]["tunnel_port"] = 70000
    data["clusters"]["Bad_Name"] = second_cluster(user="dev-agent")
    data["clusters"]["prod"] = second_cluster(user="p", tunnel_port=51002)
    error = problems_of(data)
    paths = [path for path, _ in error.problems]
    assert set(paths) == {
        "keycloak.client_id",
        "tunnel.server",
        "clusters.dev.agent.tunnel_port",
        "clusters.Bad_Name",
        "clusters.prod.agent.tunnel_port",
        "clusters.Bad_Name.agent.auth.user",
    }
    lines = str(error).splitlines()
    assert len(lines) == len(error.problems)
    assert all(line.startswith("otterscale.yaml: ") for line in lines)


def test_a_single_problem_is_a_single_line(tmp_path: Path) -> None:
    path = tmp_path / "otterscale.yaml"
    path.write_text(ORIGINAL.replace("api_port: 8299", "api_port: 99999"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (
        str(caught.value)
        == f"{path}: clusters.dev.agent.api_port: must be a port number between 1 and 65535, got 99999"
    )


# --------------------------------------------------------------------------------------------------
# Building the models in code


def _models(**server: Any) -> OtterscaleConfig:
    return OtterscaleConfig(
        keycloak=KeycloakConfig(realm_url="https://kc.example.com/realms/x", client_id="c"),
        tunnel=TunnelConfig(server=TunnelServerConfig(host="0.0.0.0", port=8300, **server)),  # noqa: S104
        clusters={
            "dev": ClusterConfig(
                agent=AgentConfig(
                    auth=AgentAuth(user="dev", password=SecretStr(DEV_PASSWORD)),
                    tunnel_port=51001,
                    api_port=8299,
                )
            )
        },
    )


def test_models_can_be_built_in_code() -> None:
    config = _models(key_seed=SecretStr(SEED))
    assert config.clusters["dev"].agent.auth.password.get_secret_value() == DEV_PASSWORD
    auth = AgentAuth(user="u", password=PROD_PASSWORD)  # type: ignore[arg-type]
    assert auth.password.get_secret_value() == PROD_PASSWORD


def test_models_in_code_still_refuse_both_keys_and_clashes() -> None:
    with pytest.raises(ValidationError, match="not both"):
        _models(key_seed=SecretStr(SEED), key_file=Path("/k.pem"))
    agent = AgentConfig(
        auth=AgentAuth(user="dev", password=SecretStr(DEV_PASSWORD)), tunnel_port=51001, api_port=1
    )
    with pytest.raises(
        ValidationError, match=r"clusters\.b\.agent\.tunnel_port: port 51001 is also the tunnel_port"
    ):
        OtterscaleConfig(
            keycloak=KeycloakConfig(realm_url="https://kc.example.com/realms/x", client_id="c"),
            tunnel=TunnelConfig(server=TunnelServerConfig(host="h", port=8300)),
            clusters={"a": ClusterConfig(agent=agent), "b": ClusterConfig(agent=agent)},
        )


def test_models_are_frozen() -> None:
    config = parse_config(ORIGINAL, "x")
    with pytest.raises(ValidationError):
        config.keycloak.client_id = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Weak secrets (issue 13): the seed is the hub's SSH identity, each password a signing key


def test_the_originals_example_secrets_are_refused_with_how_to_make_one() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(GO_EXAMPLE, "otterscale.yaml")
    assert_problem(caught.value, "tunnel.server.key_seed", "is an example value from the documentation")
    assert_problem(caught.value, "clusters.dev.agent.auth.pass", "is an example value from the documentation")
    assert "openssl rand -base64 32" in str(caught.value)
    for secret in ("change-me", "dev-agent-password"):
        assert secret not in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("tunnel__server__key_seed", "q7", "shorter than 32 characters"),
        ("tunnel__server__key_seed", "y" * 31, "shorter than 32 characters"),
        ("tunnel__server__key_seed", "a-long-random-secret", "example value"),
        ("tunnel__server__key_seed", "REPLACE-WITH-THE-OUTPUT-OF-openssl-rand-base64-32", "example value"),
        ("clusters__dev__agent__auth__pass", "hunter2", "shorter than 32 characters"),
        ("clusters__dev__agent__auth__pass", "a-long-random-password", "example value"),
        ("clusters__dev__agent__auth__pass", " change-me ", "example value"),
    ],
)
def test_weak_secrets_are_refused_naming_the_key_never_the_value(key: str, value: str, reason: str) -> None:
    error = problems_of(document(**{key: value}))
    assert_problem(error, key.replace("__", "."), reason)
    assert "`openssl rand -base64 32`" in str(error)
    assert value.strip() not in str(error)


def test_a_32_character_secret_is_enough() -> None:
    config = parse_config(
        yaml.safe_dump(
            document(tunnel__server__key_seed="s" * 32, clusters__dev__agent__auth__pass="p" * 32)
        ),
        "x",
    )
    assert config.tunnel.server.key_seed is not None
    assert len(config.tunnel.server.key_seed.get_secret_value()) == 32


def test_weak_secrets_are_refused_in_code_too() -> None:
    with pytest.raises(ValidationError, match="shorter than 32 characters"):
        AgentAuth(user="u", password=SecretStr("short"))


# --------------------------------------------------------------------------------------------------
# Identity options: subject_prefix, token type, authorized parties


def test_identity_options_default_to_the_safe_choice() -> None:
    keycloak = parse_config(ORIGINAL, "x").keycloak
    assert keycloak.subject_claim == "sub"
    assert keycloak.subject_prefix == ""
    assert keycloak.require_access_token is True
    assert keycloak.authorized_parties == ()


def test_identity_options_are_read() -> None:
    config = parse_config(
        yaml.safe_dump(
            document(
                keycloak__subject_prefix="oidc:",
                keycloak__groups_prefix="oidc:",
                keycloak__require_access_token=False,
                keycloak__authorized_parties=["dashboard", "cli"],
            )
        ),
        "x",
    )
    assert config.keycloak.subject_prefix == "oidc:"
    assert config.keycloak.require_access_token is False
    assert config.keycloak.authorized_parties == ("dashboard", "cli")
    one = parse_config(yaml.safe_dump(document(keycloak__authorized_parties="dashboard")), "x")
    assert one.keycloak.authorized_parties == ("dashboard",)


@pytest.mark.parametrize("key", ["subject_prefix", "groups_prefix"])
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("system:", "reserved prefix"),
        (" system:", "reserved prefix"),
        ("SYSTEM:x:", "reserved prefix"),
        ("oidc: ", "leading or trailing whitespace"),
        ("oi\u200bdc:", "invisible format character"),
    ],
)
def test_prefixes_follow_the_identity_rule(key: str, value: str, reason: str) -> None:
    assert_problem(problems_of(document(**{f"keycloak__{key}": value})), f"keycloak.{key}", reason)


def test_require_access_token_must_be_a_boolean() -> None:
    error = problems_of(document(keycloak__require_access_token="yes please"))
    assert_problem(error, "keycloak.require_access_token", "")


# --------------------------------------------------------------------------------------------------
# Audit


def test_audit_defaults_to_stdout_writes_only() -> None:
    audit = parse_config(ORIGINAL, "x").audit
    assert (audit.sink, audit.file, audit.reads) == ("stdout", None, "off")


def test_audit_file_sink(tmp_path: Path) -> None:
    text = ORIGINAL + f"audit:\n  sink: file\n  file: {tmp_path / 'audit.log'}\n  max_bytes: 1048576\n"
    text += "  backups: 3\n  reads: metadata\n"
    audit = parse_config(text, "x").audit
    assert audit.sink == "file"
    assert audit.file == tmp_path / "audit.log"
    assert (audit.max_bytes, audit.backups, audit.reads) == (1048576, 3, "metadata")


def test_audit_reads_off_may_be_written_unquoted() -> None:
    # YAML 1.1 reads `off` as false.
    assert parse_config(ORIGINAL + "audit:\n  reads: off\n", "x").audit.reads == "off"


@pytest.mark.parametrize(
    ("section", "path", "reason"),
    [
        ({"sink": "file"}, "audit", "sink: file needs file: PATH"),
        ({"file": "/tmp/a.log"}, "audit", "file is used only with sink: file"),
        ({"sink": "syslog"}, "audit.sink", "must be 'stdout' or 'file'"),
        ({"reads": "all"}, "audit.reads", "must be 'off' or 'metadata'"),
        ({"reads": True}, "audit.reads", "must be 'off' or 'metadata'"),
        ({"backups": 0}, "audit.backups", "greater than or equal to 1"),
        ({"max_bytes": 10}, "audit.max_bytes", "greater than or equal to 65536"),
        ({"level": "all"}, "audit.level", "unknown key"),
    ],
)
def test_audit_mistakes_name_the_key(section: dict[str, Any], path: str, reason: str) -> None:
    assert_problem(problems_of(document(audit=section)), path, reason)


def test_the_readme_sample_is_refused_only_for_its_example_secrets() -> None:
    """The README's otterscale.yaml, copied as is, must not run with its placeholder secrets."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    start = readme.index("   keycloak:\n     realm_url:")
    sample = textwrap.dedent(readme[start : readme.index("   ```", start)])
    with pytest.raises(ConfigError) as caught:
        parse_config(sample, "otterscale.yaml")
    assert {path for path, _ in caught.value.problems} == {
        "tunnel.server.key_seed",
        "clusters.dev.agent.auth.pass",
    }
    assert all("example value" in reason for _, reason in caught.value.problems)


# --------------------------------------------------------------------------------------------------
# The agents' runtime section


def test_runtime_section_is_optional_with_documented_defaults() -> None:
    runtime = parse_config(ORIGINAL, "x").runtime
    assert (runtime.max_exec_sessions_per_subject, runtime.max_port_forward_sessions_per_subject) == (10, 10)
    assert (runtime.max_exec_sessions, runtime.max_port_forward_sessions) == (100, 100)
    assert (runtime.idle_timeout_seconds, runtime.max_lifetime_seconds) == (1800.0, 28800.0)
    assert (runtime.max_write_bytes, runtime.max_pending_bytes) == (65536, 262144)
    assert (runtime.heartbeat_seconds, runtime.write_gap_timeout_seconds) == (30.0, 5.0)
    assert runtime.audit_argv == "full"


def test_runtime_section_values() -> None:
    data = document(
        runtime={"max_exec_sessions_per_subject": 2, "idle_timeout_seconds": 60, "audit_argv": "none"}
    )
    runtime = parse_config(yaml.safe_dump(data), "x").runtime
    assert runtime.max_exec_sessions_per_subject == 2
    assert runtime.idle_timeout_seconds == 60.0
    assert runtime.audit_argv == "none"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("max_exec_sessions", 0, "greater than or equal to 1"),
        ("max_port_forward_sessions_per_subject", True, "must be an integer"),
        ("idle_timeout_seconds", 0, "greater than 0"),
        ("max_write_bytes", 10, "greater than or equal to 1024"),
        ("audit_argv", "some", "'full', 'command' or 'none'"),
        ("max_sessions", 3, "unknown key"),
    ],
)
def test_runtime_section_bad_values_name_the_key(key: str, value: Any, fragment: str) -> None:
    error = problems_of(document(runtime={key: value}))
    assert_problem(error, f"runtime.{key}", fragment)
