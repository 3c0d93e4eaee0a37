"""The hub-only configuration of fan-out calls: cluster labels, ``fanout`` and ``access``."""

from __future__ import annotations

import pytest

from otterscale.common import ConfigError, parse_config

BASE = """
keycloak: {realm_url: "http://127.0.0.1/realms/x", client_id: c}
tunnel: {server: {host: 127.0.0.1, port: 8300, key_seed: tunnel-key-seed-for-the-fanout-tests-0001}}
clusters:
  east:
    agent: {auth: {user: e, pass: east-agent-password-for-the-fanout-tests}, tunnel_port: 5001, api_port: 1}
    labels: {env: prod, "example.com/region": eu}
  west: {agent: {auth: {user: w, pass: west-agent-password-for-fanout-tests}, tunnel_port: 5002, api_port: 1}}
"""


def test_defaults_and_labels() -> None:
    config = parse_config(BASE, "otterscale.yaml")
    assert config.clusters["east"].labels == {"env": "prod", "example.com/region": "eu"}
    assert config.clusters["west"].labels == {}
    assert config.access is None
    fanout = config.fanout
    assert (fanout.max_clusters_per_call, fanout.max_legs_per_subject, fanout.max_inflight_per_cluster) == (
        1000,
        2000,
        8,
    )
    assert fanout.token_key is None


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (
            "fanout: {max_clusters_per_call: 0}",
            "fanout.max_clusters_per_call: must be greater than or equal to 1",
        ),
        ("fanout: {max_inflight_per_cluster: true}", "fanout.max_inflight_per_cluster:"),
        ("fanout: {default_page_items: 10, max_page_items: 5}", "default_page_items must not be larger"),
        ("fanout: {token_key: too-short}", "fanout.token_key: is shorter than 32 characters"),
        ("fanout: {tokenkey: x}", "fanout.tokenkey:"),
        ("access: {default: some}", "access.default: must be 'all' or 'none'"),
        ("access: {rules: [{groups: [g]}]}", "access.rules.0: a rule needs clusters or cluster_labels"),
        ("access: {rules: [{clusters: [east]}]}", "access.rules.0: a rule needs groups or subjects"),
        (
            "access: {rules: [{groups: [g], clusters: [nowhere]}]}",
            "access.rules.0.clusters.0: cluster 'nowhere'",
        ),
        (
            "access: {rules: [{groups: [g], clusters: ['Bad!']}]}",
            "access.rules.0.clusters.0: must be a cluster name",
        ),
        ("access: {rules: [{groups: [g], cluster_labels: 'env in (a'}]}", "access.rules.0.cluster_labels:"),
    ],
)
def test_problems_name_the_key(extra: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + extra + "\n", "otterscale.yaml")
    assert problem in str(caught.value)


def test_bad_labels_name_the_key() -> None:
    text = BASE.replace("env: prod", 'env: "-x"').replace('region": eu', 'region": 3')
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "otterscale.yaml")
    message = str(caught.value)
    assert "clusters.east.labels.env: a label value" in message
    assert "clusters.east.labels.example.com/region: must be a string" in message


def test_token_keys_are_never_echoed() -> None:
    secret = "s3cret-but-too-short"
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + f"fanout: {{token_key: {secret}, previous_token_keys: [{secret}]}}\n", "x")
    assert secret not in str(caught.value)
    config = parse_config(BASE + f"fanout: {{token_key: {'k' * 40}}}\n", "x")
    assert "k" * 40 not in repr(config)


def test_globs_and_selectors_in_rules() -> None:
    config = parse_config(
        BASE
        + "access: {default: none, rules: [{groups: [team-a], clusters: ['e*']}, "
        + "{subjects: [auditor], cluster_labels: 'env=prod'}]}\n",
        "x",
    )
    assert config.access is not None
    assert config.access.default == "none"
    assert [rule.clusters for rule in config.access.rules] == [["e*"], []]
