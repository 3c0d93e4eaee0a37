"""Signed hub-to-agent identity headers: roundtrip, tampering, freshness, encoding."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from otterscale.common import (
    GROUPS_HEADER,
    IDENTITY_HEADER_PREFIX,
    SIGNATURE_HEADER,
    SUBJECT_HEADER,
    TIMESTAMP_HEADER,
    AuthenticationError,
    Identity,
    IdentityHeaderError,
    derive_identity_key,
    sign_identity,
    strip_identity_headers,
    verify_identity,
)
from otterscale.common._identity import identity_name_problem

CLUSTER = "dev"
METHOD = "/otterscale.resource.v1.ResourceService/Get"
NOW = 1_750_000_000.0
KEY = derive_identity_key(CLUSTER, "dev-agent-password")
ALICE = Identity("alice@example.com", ("team,platform", "ops", "grüppe/ü"))


def _sign(identity: Identity = ALICE, **overrides: object) -> dict[str, str]:
    args: dict[str, object] = {"cluster": CLUSTER, "method": METHOD, "key": KEY, "now": NOW}
    args.update(overrides)
    return sign_identity(identity, **args)  # type: ignore[arg-type]


def _verify(headers: dict[str, str], **overrides: object) -> Identity:
    args: dict[str, object] = {"cluster": CLUSTER, "method": METHOD, "key": KEY, "now": NOW}
    args.update(overrides)
    return verify_identity(headers, **args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Key derivation


def test_derived_key_is_deterministic_and_32_bytes() -> None:
    assert derive_identity_key("dev", "pw") == derive_identity_key("dev", "pw")
    assert derive_identity_key("dev", "pw") == derive_identity_key("dev", b"pw")
    assert len(derive_identity_key("dev", "pw")) == 32


def test_derived_key_differs_per_cluster_and_password() -> None:
    keys = {
        derive_identity_key("dev", "pw"),
        derive_identity_key("prod", "pw"),
        derive_identity_key("dev", "pw2"),
    }
    assert len(keys) == 3
    assert derive_identity_key("dev", "pw") != b"pw"


def test_derived_key_refuses_empty_inputs() -> None:
    with pytest.raises(ValueError, match="password"):
        derive_identity_key("dev", "")
    with pytest.raises(ValueError, match="cluster"):
        derive_identity_key("", "pw")


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        sign_identity(ALICE, cluster=CLUSTER, method=METHOD, key=b"short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        verify_identity({}, cluster=CLUSTER, method=METHOD, key=b"short")


# --------------------------------------------------------------------------------------------------
# Roundtrip and format


def test_roundtrip() -> None:
    assert _verify(_sign()) == ALICE


def test_roundtrip_without_groups_omits_the_groups_header() -> None:
    headers = _sign(Identity("bob"))
    assert GROUPS_HEADER not in headers
    assert _verify(headers) == Identity("bob")


def test_header_format() -> None:
    headers = _sign()
    assert set(headers) == {SUBJECT_HEADER, GROUPS_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER}
    assert all(name.lower().startswith(IDENTITY_HEADER_PREFIX) for name in headers)
    # Plain subjects stay readable (what the original agent read from X-Otterscale-Subject).
    assert headers[SUBJECT_HEADER] == "alice@example.com"
    assert headers[GROUPS_HEADER] == "team%2Cplatform,ops,gr%C3%BCppe/%C3%BC"
    assert headers[TIMESTAMP_HEADER] == "1750000000"
    assert headers[SIGNATURE_HEADER].startswith("v1=")
    assert len(headers[SIGNATURE_HEADER]) == 3 + 43
    for value in headers.values():
        assert value.isascii()
        assert value.isprintable()


def test_real_clock_is_used_by_default() -> None:
    headers = sign_identity(ALICE, cluster=CLUSTER, method=METHOD, key=KEY)
    assert verify_identity(headers, cluster=CLUSTER, method=METHOD, key=KEY) == ALICE


def test_header_names_are_case_insensitive() -> None:
    headers = _sign()
    assert _verify({name.lower(): value for name, value in headers.items()}) == ALICE
    assert _verify({name.upper(): value for name, value in headers.items()}) == ALICE


def test_other_headers_are_ignored() -> None:
    headers = {"Content-Type": "application/proto", "Authorization": "Bearer x", **_sign()}
    assert _verify(headers) == ALICE


def test_identity_header_error_is_an_authentication_error() -> None:
    assert issubclass(IdentityHeaderError, AuthenticationError)
    assert IdentityHeaderError.connect_code == "unauthenticated"


# --------------------------------------------------------------------------------------------------
# Tampering


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (SUBJECT_HEADER, "mallory@example.com"),
        (GROUPS_HEADER, "team%2Cplatform,ops,admins"),
        (GROUPS_HEADER, "ops,team%2Cplatform,gr%C3%BCppe/%C3%BC"),  # order is signed too
        (GROUPS_HEADER, "team,platform,ops,gr%C3%BCppe/%C3%BC"),  # a comma moved out of a group
        (TIMESTAMP_HEADER, "1750000001"),
    ],
)
def test_tampered_field_fails(header: str, value: str) -> None:
    headers = _sign()
    headers[header] = value
    with pytest.raises(IdentityHeaderError, match="does not match"):
        _verify(headers)


def test_dropped_groups_header_fails() -> None:
    headers = _sign()
    del headers[GROUPS_HEADER]
    with pytest.raises(IdentityHeaderError, match="does not match"):
        _verify(headers)


def test_added_groups_header_fails() -> None:
    headers = _sign(Identity("bob"))
    headers[GROUPS_HEADER] = "admins"
    with pytest.raises(IdentityHeaderError, match="does not match"):
        _verify(headers)


def test_other_method_fails() -> None:
    with pytest.raises(IdentityHeaderError, match="does not match"):
        _verify(_sign(), method="/otterscale.resource.v1.ResourceService/Delete")


def test_other_cluster_fails() -> None:
    with pytest.raises(IdentityHeaderError, match="does not match"):
        _verify(_sign(), cluster="prod")


def test_signature_made_with_another_clusters_key_fails() -> None:
    prod_key = derive_identity_key("prod", "dev-agent-password")  # same password, other cluster
    headers = _sign(key=prod_key, cluster=CLUSTER)
    with pytest.raises(IdentityHeaderError, match="does not match"):
        _verify(headers)


def test_error_messages_do_not_contain_the_signature_or_key() -> None:
    headers = _sign()
    headers[SUBJECT_HEADER] = "mallory"
    with pytest.raises(IdentityHeaderError) as caught:
        _verify(headers)
    text = str(caught.value)
    assert headers[SIGNATURE_HEADER][3:] not in text
    assert KEY.hex() not in text


# --------------------------------------------------------------------------------------------------
# Freshness


def test_signature_inside_the_window_is_accepted() -> None:
    headers = _sign()
    assert _verify(headers, now=NOW + 30) == ALICE
    assert _verify(headers, now=NOW - 30) == ALICE


def test_replay_after_the_window_is_refused() -> None:
    with pytest.raises(IdentityHeaderError, match=r"expired: X-Otterscale-Timestamp is 31s old"):
        _verify(_sign(), now=NOW + 31)


def test_future_timestamp_beyond_skew_is_refused() -> None:
    with pytest.raises(IdentityHeaderError, match=r"X-Otterscale-Timestamp is 31s in the future"):
        _verify(_sign(), now=NOW - 31)


def test_skew_is_configurable() -> None:
    assert _verify(_sign(), now=NOW + 100, max_skew_seconds=120) == ALICE
    with pytest.raises(IdentityHeaderError, match="expired"):
        _verify(_sign(), now=NOW + 6, max_skew_seconds=5)


def test_forged_headers_report_the_signature_not_the_age() -> None:
    headers = _sign()
    headers[SUBJECT_HEADER] = "mallory"
    with pytest.raises(IdentityHeaderError, match="does not match"):
        _verify(headers, now=NOW + 3600)


# --------------------------------------------------------------------------------------------------
# Missing and malformed headers


@pytest.mark.parametrize("header", [SUBJECT_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER])
def test_missing_header_is_named(header: str) -> None:
    headers = _sign()
    del headers[header]
    with pytest.raises(IdentityHeaderError, match=f"header {header} is missing"):
        _verify(headers)


@pytest.mark.parametrize("header", [SUBJECT_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER])
def test_empty_header_is_named(header: str) -> None:
    headers = _sign()
    headers[header] = ""
    with pytest.raises(IdentityHeaderError, match=f"header {header} is empty"):
        _verify(headers)


def test_no_headers_at_all() -> None:
    with pytest.raises(IdentityHeaderError, match="X-Otterscale-Subject is missing"):
        _verify({})


def test_header_given_twice_is_refused() -> None:
    headers = _sign()
    headers["x-otterscale-subject"] = "mallory"
    with pytest.raises(IdentityHeaderError, match="more than once"):
        _verify(headers)


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [
        (TIMESTAMP_HEADER, "1750000000.5", "unix seconds"),
        (TIMESTAMP_HEADER, "-5", "unix seconds"),
        (TIMESTAMP_HEADER, " 1750000000", "unix seconds"),
        (SIGNATURE_HEADER, "v2=" + "A" * 43, "'v1=' signature"),
        (SIGNATURE_HEADER, "A" * 46, "'v1=' signature"),
        (SIGNATURE_HEADER, "v1=" + "A" * 42, "43 base64url characters"),
        (SIGNATURE_HEADER, "v1=" + "A" * 42 + "=", "43 base64url characters"),
        (SIGNATURE_HEADER, "v1=" + "+" * 43, "43 base64url characters"),
        (SUBJECT_HEADER, "alice%40example.com", "canonical"),  # '@' must not be encoded
        (SUBJECT_HEADER, "al ice", "canonical"),
        (SUBJECT_HEADER, "%zz", "canonical"),
        (SUBJECT_HEADER, "%ff", "not UTF-8"),
        (SUBJECT_HEADER, "zo\u00eb", "canonical"),  # raw latin-1 as an ASGI server would decode it
        (GROUPS_HEADER, "ops,,dev", "canonical"),
        (GROUPS_HEADER, "ops,", "canonical"),
    ],
)
def test_malformed_header(header: str, value: str, reason: str) -> None:
    headers = _sign()
    headers[header] = value
    with pytest.raises(IdentityHeaderError, match="malformed") as caught:
        _verify(headers)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("header", "value"),
    [(SUBJECT_HEADER, "system:admin"), (GROUPS_HEADER, "ops,system:masters"), (SUBJECT_HEADER, "a%0Ab")],
)
def test_invalid_identity_in_headers_is_refused(header: str, value: str) -> None:
    headers = _sign()
    headers[header] = value
    with pytest.raises(IdentityHeaderError, match="identity headers are invalid"):
        _verify(headers)


# --------------------------------------------------------------------------------------------------
# Stripping client-supplied headers


def test_strip_identity_headers_from_a_mapping() -> None:
    headers = {
        "Content-Type": "application/json",
        "X-Otterscale-Subject": "admin",
        "x-otterscale-groups": "g",
    }
    assert strip_identity_headers(headers) == {"Content-Type": "application/json"}
    assert "X-Otterscale-Subject" in headers  # the input is left alone


def test_strip_identity_headers_from_pairs() -> None:
    pairs = [("content-type", "a"), ("X-OTTERSCALE-TIMESTAMP", "1"), ("x-otterscale-anything", "x")]
    assert strip_identity_headers(pairs) == [("content-type", "a")]
    raw = [
        (b"x-otterscale-subject", b"admin"),
        (b"authorization", b"Bearer t"),
        (b"X-Otterscale-Signature", b"v"),
    ]
    assert strip_identity_headers(raw) == [(b"authorization", b"Bearer t")]


# --------------------------------------------------------------------------------------------------
# Properties

# Every name the identity rule accepts (no separators, format or control characters, nothing
# Kubernetes could read as reserved).
_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Cf", "Cn", "Zs", "Zl", "Zp")),
    min_size=1,
    max_size=40,
).filter(lambda value: identity_name_problem(value, "name") is None)
_identities = st.builds(
    Identity,
    subject=_names,
    groups=st.lists(_names, max_size=8, unique=True).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(
    identity=_identities,
    cluster=st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True),
    now=st.integers(0, 10**12 - 1),
)
def test_property_random_identities_roundtrip(identity: Identity, cluster: str, now: int) -> None:
    key = derive_identity_key(cluster, "pw")
    headers = sign_identity(identity, cluster=cluster, method=METHOD, key=key, now=now)
    assert all(value.isascii() for value in headers.values())
    assert verify_identity(headers, cluster=cluster, method=METHOD, key=key, now=now) == identity


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(identity=_identities, data=st.data())
def test_property_any_single_character_change_of_the_signature_fails(
    identity: Identity, data: st.DataObject
) -> None:
    headers = sign_identity(identity, cluster=CLUSTER, method=METHOD, key=KEY, now=NOW)
    signature = headers[SIGNATURE_HEADER]
    index = data.draw(st.integers(0, len(signature) - 1), label="index")
    replacement = data.draw(
        st.sampled_from(string.ascii_letters + string.digits + "-_=+/").filter(
            lambda c: c != signature[index]
        ),
        label="replacement",
    )
    headers[SIGNATURE_HEADER] = signature[:index] + replacement + signature[index + 1 :]
    with pytest.raises(IdentityHeaderError):
        _verify(headers)


@settings(max_examples=100, deadline=None)
@given(identity=_identities, other=_identities)
def test_property_signature_binds_the_identity(identity: Identity, other: Identity) -> None:
    signed = sign_identity(identity, cluster=CLUSTER, method=METHOD, key=KEY, now=NOW)
    forged = sign_identity(other, cluster=CLUSTER, method=METHOD, key=KEY, now=NOW)
    forged[SIGNATURE_HEADER] = signed[SIGNATURE_HEADER]
    if other == identity:
        assert _verify(forged) == identity
    else:
        with pytest.raises(IdentityHeaderError):
            _verify(forged)


def test_cluster_and_method_are_checked() -> None:
    with pytest.raises(ValueError, match="cluster must not be empty"):
        sign_identity(ALICE, cluster="", method=METHOD, key=KEY)
    with pytest.raises(ValueError, match="full procedure path"):
        verify_identity(_sign(), cluster=CLUSTER, method="Get", key=KEY)


_FIELDS = ["subject", "groups", "timestamp", "cluster", "method", "key"]


@settings(max_examples=300, deadline=None)
@given(identity=_identities, other=_identities, field=st.sampled_from(_FIELDS), data=st.data())
def test_property_any_single_field_tamper_fails(
    identity: Identity, other: Identity, field: str, data: st.DataObject
) -> None:
    """Change exactly one signed input (a header, or what the agent knows: cluster, RPC, key),
    keep everything else and stay inside the freshness window: verification always fails."""
    headers = sign_identity(identity, cluster=CLUSTER, method=METHOD, key=KEY, now=NOW)
    expected: dict[str, object] = {"cluster": CLUSTER, "method": METHOD, "key": KEY, "now": NOW}
    if field == "subject":
        assume(other.subject != identity.subject)
        headers[SUBJECT_HEADER] = sign_identity(
            Identity(other.subject), cluster=CLUSTER, method=METHOD, key=KEY
        )[SUBJECT_HEADER]
    elif field == "groups":
        assume(other.groups != identity.groups)
        forged = sign_identity(
            Identity(identity.subject, other.groups), cluster=CLUSTER, method=METHOD, key=KEY
        )
        headers.pop(GROUPS_HEADER, None)
        if GROUPS_HEADER in forged:
            headers[GROUPS_HEADER] = forged[GROUPS_HEADER]
    elif field == "timestamp":
        delta = data.draw(st.integers(-30, 30).filter(bool), label="delta")
        headers[TIMESTAMP_HEADER] = str(int(NOW) + delta)
    elif field == "cluster":
        expected["cluster"] = data.draw(
            st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True).filter(lambda c: c != CLUSTER), label="cluster"
        )
    elif field == "method":
        expected["method"] = data.draw(
            st.sampled_from(
                [
                    f"/otterscale.resource.v1.ResourceService/{m}"
                    for m in ("Discovery", "Schema", "List", "Watch")
                ]
                + ["/otterscale.cluster.v1.AgentService/GetAgentInfo", METHOD + "/", METHOD.lower()]
            ),
            label="method",
        )
    else:
        password = data.draw(st.text(min_size=1, max_size=20).filter(lambda p: p != "dev-agent-password"))
        expected["key"] = derive_identity_key(CLUSTER, password)
    with pytest.raises(IdentityHeaderError, match="does not match"):
        verify_identity(headers, **expected)  # type: ignore[arg-type]
