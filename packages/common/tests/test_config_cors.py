"""The ``cors`` section of otterscale.yaml: origins are checked and made canonical at load time."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from otterscale.common import ConfigError, CorsConfig, parse_config

from .test_config import ORIGINAL


def load(cors: Any) -> CorsConfig:
    data = yaml.safe_load(ORIGINAL)
    data["cors"] = cors
    return parse_config(yaml.safe_dump(data), "otterscale.yaml").cors


def problems(cors: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load(cors)
    return list(caught.value.problems)


def test_absent_means_same_origin_only() -> None:
    config = parse_config(ORIGINAL, "otterscale.yaml").cors
    assert config == CorsConfig()
    assert config.allowed_origins == ()
    assert config.allow_credentials is False
    assert config.extra_allowed_headers == ()


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("https://dashboard.example.com", "https://dashboard.example.com"),
        ("HTTPS://Dashboard.Example.COM", "https://dashboard.example.com"),
        ("https://dashboard.example.com:443", "https://dashboard.example.com"),
        ("http://dashboard.example.com:80", "http://dashboard.example.com"),
        ("https://dashboard.example.com:8443", "https://dashboard.example.com:8443"),
        ("http://127.0.0.1:5173", "http://127.0.0.1:5173"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("https://*.Example.com", "https://*.example.com"),
        ("https://*.example.com:8443", "https://*.example.com:8443"),
        ("http://*.localhost", "http://*.localhost"),
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
        (" https://padded.example.com ", "https://padded.example.com"),
        ("*", "*"),
    ],
)
def test_origins_are_made_canonical(written: str, canonical: str) -> None:
    assert load({"allowed_origins": [written]}).allowed_origins == (canonical,)


@pytest.mark.parametrize(
    ("written", "fragment"),
    [
        ("dashboard.example.com", "must be an http(s) origin"),
        ("ftp://files.example.com", "must be an http(s) origin"),
        ("https://dashboard.example.com/", "no trailing '/'"),
        ("https://dashboard.example.com/app", "no path"),
        ("https://dashboard.example.com?x=1", "no user info, query or fragment"),
        ("https://user@dashboard.example.com", "no user info"),
        ("https://dashboard.example.com:0", "invalid port"),
        ("https://dashboard.example.com:99999", "invalid port"),
        ("https://dashboard.example.com:http", "invalid port"),
        ("https://", "invalid host"),
        ("https://bad_host.example.com", "invalid host"),
        ("https://-bad.example.com", "invalid host"),
        ("https://a..example.com", "invalid host"),
        ("https://bücher.example", "ASCII (xn--) form"),
        ("https://a.*.example.com", "only stand for the first label"),
        ("https://*example.com", "only stand for the first label"),
        ("https://*.*.example.com", "only stand for the first label"),
        ("https://*.com", "at least two labels"),
        ("https://*.[::1]", "has an invalid"),
        ("http://[::1", "invalid IPv6 host"),
        ("http://[nonsense]:80", "invalid host"),
    ],
)
def test_bad_origins_name_the_entry_and_the_rule(written: str, fragment: str) -> None:
    found = problems({"allowed_origins": ["https://ok.example.com", written]})
    assert [path for path, _ in found] == ["cors.allowed_origins.1"], found
    assert fragment in found[0][1], found


def test_star_is_refused_with_credentials() -> None:
    found = problems({"allowed_origins": ["*"], "allow_credentials": True})
    assert found == [
        ("cors", "'*' (any origin) is refused while allow_credentials is true: list the origins")
    ]
    assert load({"allowed_origins": ["https://a.example.com"], "allow_credentials": True}).allow_credentials


def test_allow_credentials_must_be_a_boolean() -> None:
    # Strict: a quoted "yes" must not quietly turn credentials on.
    found = problems({"allowed_origins": ["https://a.example.com"], "allow_credentials": "yes"})
    assert [path for path, _ in found] == ["cors.allow_credentials"]


def test_extra_headers_are_header_names_in_lower_case() -> None:
    config = load({"allowed_origins": ["https://a.example.com"], "extra_allowed_headers": ["X-Tenant"]})
    assert config.extra_allowed_headers == ("x-tenant",)
    found = problems({"extra_allowed_headers": ["X Tenant", "ok", "bad:colon"]})
    assert [path for path, _ in found] == ["cors.extra_allowed_headers.0", "cors.extra_allowed_headers.2"]
    assert all("must be an HTTP header name" in reason for _, reason in found)


def test_unknown_cors_keys_are_refused_with_a_hint() -> None:
    found = problems({"allowed_origin": ["https://a.example.com"]})
    assert found[0][0] == "cors.allowed_origin"
    assert "did you mean allowed_origins?" in found[0][1]


def test_origins_must_be_a_list_of_strings() -> None:
    found = problems({"allowed_origins": "https://a.example.com"})
    assert [path for path, _ in found] == ["cors.allowed_origins"]
    found = problems({"allowed_origins": [8080]})
    assert found == [("cors.allowed_origins.0", "must be a string (quote the value in YAML)")]
