"""The test Keycloak is a real OIDC issuer: signed tokens the hub's verifier accepts, real refusals.

Tests marked ``integration`` start Keycloak (the session's shared instance); the rest check the
realm document, JDK choice, the Maven Central fetch and the plugin's failure mode without it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path
from typing import Any

import jwt
import pytest

from otterscale.common import AuthenticationError, IdentityProviderUnavailableError, OIDCVerifier
from otterscale.testing import Keycloak, KeycloakError, TokenRequestError, _keycloak, keycloak_home, tools


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _audiences(claims: dict[str, Any]) -> list[str]:
    aud = claims.get("aud")
    return [aud] if isinstance(aud, str) else list(aud or [])


# --- against a running Keycloak ----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("user", "groups"), [("alice", {"team-a"}), ("bob", {"team-b"}), ("carol", {"team-a", "ops"})]
)
def test_password_grant_gives_rs256_token_for_the_realm(
    keycloak: Keycloak, user: str, groups: set[str]
) -> None:
    token = keycloak.token(user)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header.get("kid")
    claims = _claims(token)
    assert claims["iss"] == keycloak.realm_url
    assert keycloak.realm_url == f"http://127.0.0.1:{keycloak.port}/realms/otterscale"
    assert "otterscale" in _audiences(claims)
    assert set(claims["groups"]) == groups  # flat names: the mapper has full.path=false
    assert claims["preferred_username"] == user
    assert claims["exp"] - claims["iat"] == keycloak.access_token_lifespan


@pytest.mark.integration
async def test_tokens_verify_with_the_hub_verifier(keycloak: Keycloak) -> None:
    async with OIDCVerifier(issuer=keycloak.realm_url, audience=keycloak.client_id) as verifier:
        alice = await verifier.verify(keycloak.token("alice"))
        bob = await verifier.verify(keycloak.token("bob", "bob-password"))
        carol = await verifier.verify(keycloak.token("carol"))
    assert alice.groups == ("team-a",)
    assert bob.groups == ("team-b",)
    assert set(carol.groups) == {"team-a", "ops"}
    # The subject is Keycloak's user id, stable across tokens and distinct per user.
    assert len({alice.subject, bob.subject, carol.subject}) == 3
    assert alice.subject == _claims(keycloak.token("alice"))["sub"]


@pytest.mark.integration
async def test_token_for_another_audience_is_refused_by_the_verifier(keycloak: Keycloak) -> None:
    token = keycloak.token("alice", client_id=keycloak.other_client_id)
    assert "otterscale" not in _audiences(_claims(token))
    async with OIDCVerifier(issuer=keycloak.realm_url, audience=keycloak.client_id) as verifier:
        with pytest.raises(AuthenticationError, match="audience"):
            await verifier.verify(token)


@pytest.mark.integration
def test_wrong_password_is_refused_with_a_clear_error(keycloak: Keycloak) -> None:
    with pytest.raises(TokenRequestError) as caught:
        keycloak.token("alice", "not-alices-password")
    err = caught.value
    assert err.status in (400, 401)
    assert err.error == "invalid_grant"
    assert "alice" in str(err)
    assert "Invalid user credentials" in str(err)
    assert "not-alices-password" not in str(err)


@pytest.mark.integration
def test_unknown_user_is_refused(keycloak: Keycloak) -> None:
    with pytest.raises(TokenRequestError, match="invalid_grant"):
        keycloak.token("nobody", "whatever")


@pytest.mark.integration
async def test_added_user_gets_tokens_with_new_and_existing_groups(keycloak: Keycloak) -> None:
    name = f"user-{uuid.uuid4().hex[:8]}"
    keycloak.add_user(name, "s3cret-pw", ["team-b", f"grp-{name}"])
    token = keycloak.token(name)  # the password is remembered
    assert set(_claims(token)["groups"]) == {"team-b", f"grp-{name}"}
    async with OIDCVerifier(issuer=keycloak.realm_url, audience="otterscale") as verifier:
        identity = await verifier.verify(token)
    assert set(identity.groups) == {"team-b", f"grp-{name}"}


@pytest.mark.integration
async def test_down_then_back_on_the_same_issuer_and_keys(keycloak: Keycloak) -> None:
    before = keycloak.token("bob")
    issuer = keycloak.realm_url
    keycloak.stop()
    try:
        with pytest.raises(KeycloakError, match="cannot reach Keycloak"):
            keycloak.token("bob")
        async with OIDCVerifier(issuer=issuer, audience="otterscale", timeout_seconds=2) as verifier:
            with pytest.raises(IdentityProviderUnavailableError):
                await verifier.verify(before)
    finally:
        keycloak.start()
    assert keycloak.realm_url == issuer
    assert keycloak.startup_seconds > 0
    # Same database, so the same signing keys: a token issued before the outage still verifies.
    async with OIDCVerifier(issuer=issuer, audience="otterscale") as verifier:
        assert (await verifier.verify(before)).groups == ("team-b",)
        assert (await verifier.verify(keycloak.token("bob"))).groups == ("team-b",)


@pytest.mark.integration
def test_keycloak_runs_with_a_bounded_heap(keycloak: Keycloak) -> None:
    # Keycloak's JVM runs with -Xmx512m; resident memory stays well under a gigabyte.
    assert 100e6 < keycloak.rss_bytes() < 1e9


# --- without Keycloak ------------------------------------------------------------------------------


def test_realm_document_has_audience_and_flat_groups_mappers() -> None:
    realm = _keycloak.realm_representation(_keycloak.DEFAULT_USERS)
    clients = {c["clientId"]: c for c in realm["clients"]}
    otterscale = clients["otterscale"]
    assert otterscale["publicClient"]
    assert otterscale["directAccessGrantsEnabled"]
    mappers = {m["protocolMapper"]: m["config"] for m in otterscale["protocolMappers"]}
    assert mappers["oidc-audience-mapper"]["included.client.audience"] == "otterscale"
    assert mappers["oidc-group-membership-mapper"]["full.path"] == "false"
    assert mappers["oidc-group-membership-mapper"]["claim.name"] == "groups"
    other = {m["protocolMapper"]: m["config"] for m in clients["other-app"]["protocolMappers"]}
    assert other["oidc-audience-mapper"]["included.client.audience"] == "other-app"
    assert {g["name"] for g in realm["groups"]} == {"team-a", "team-b", "ops"}
    users = {u["username"]: u for u in realm["users"]}
    assert users["carol"]["groups"] == ["/team-a", "/ops"]


def _fake_jdk(root: Path, name: str, version: str) -> Path:
    home = root / name
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "java").write_text("#!/bin/sh\n")
    (home / "release").write_text(f'JAVA_VERSION="{version}"\n')
    return home


def test_newest_supported_jdk_is_chosen(tmp_path: Path) -> None:
    jdk11 = _fake_jdk(tmp_path, "jdk11", "11.0.2")
    jdk17 = _fake_jdk(tmp_path, "jdk17", "17.0.15")
    jdk25 = _fake_jdk(tmp_path, "jdk25", "25.0.3")
    jdk26 = _fake_jdk(tmp_path, "jdk26", "26")
    assert _keycloak.find_java_home([jdk11, jdk17, jdk25, jdk26]) == jdk25
    assert _keycloak.find_java_home([jdk11, jdk17]) == jdk17
    with pytest.raises(KeycloakError, match="needs a JDK 17 or 21 or 25"):
        _keycloak.find_java_home([jdk11, jdk26])


def test_keycloak_is_a_default_tool_fetched_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "keycloak" in tools.DEFAULT_TOOLS
    monkeypatch.setenv("OTTERSCALE_TOOLS_DIR", str(tmp_path))
    tool = tools.TOOLS["keycloak"]
    assert not tool.go
    assert tool.home == tmp_path / f"keycloak-{tools.KEYCLOAK_VERSION}"
    with pytest.raises(tools.ToolMissingError, match="nox -s tools -- keycloak"):
        keycloak_home()


def _zip(path: Path, members: dict[str, tuple[bytes, int]]) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, (data, mode) in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, data)
    return path.read_bytes()


def test_download_is_checked_against_the_published_digest(tmp_path: Path) -> None:
    archive = tmp_path / "dist.zip"
    data = _zip(archive, {"keycloak-1/bin/kc.sh": (b"#!/bin/sh\n", 0o755)})
    url = archive.as_uri()
    tools._download(url, tmp_path / "ok.zip", "sha512", hashlib.sha512(data).hexdigest())
    assert (tmp_path / "ok.zip").read_bytes() == data
    with pytest.raises(RuntimeError, match="sha1 mismatch"):
        tools._download(url, tmp_path / "bad.zip", "sha1", "0" * 40)


def test_unzip_keeps_exec_bits_and_refuses_escapes(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    _zip(good, {"kc/bin/kc.sh": (b"#!/bin/sh\n", 0o755), "kc/conf/keycloak.conf": (b"", 0o644)})
    tools._unzip(good, tmp_path / "out")
    assert os.access(tmp_path / "out" / "kc" / "bin" / "kc.sh", os.X_OK)
    assert not os.access(tmp_path / "out" / "kc" / "conf" / "keycloak.conf", os.X_OK)
    evil = tmp_path / "evil.zip"
    _zip(evil, {"../escaped.txt": (b"x", 0o644)})
    with pytest.raises(RuntimeError, match="escapes"):
        tools._unzip(evil, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()


def test_missing_distribution_fails_the_test_with_the_fetch_command(tmp_path: Path) -> None:
    test_file = tmp_path / "test_uses_keycloak.py"
    test_file.write_text(
        textwrap.dedent(
            """
            def test_it(keycloak):
                pass
            """
        )
    )
    env = {**os.environ, "OTTERSCALE_TOOLS_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(test_file),
            "-p",
            "no:cacheprovider",
            "-rA",
            "--rootdir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "nox -s tools -- keycloak" in out
    assert "1 error" in out
    assert "skipped" not in out
