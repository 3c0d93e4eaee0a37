"""Identities Kubernetes would read differently never reach it; identity headers sent twice are
refused; only access tokens open the API (issue 13: parts 1, 4 and 5).

Against a real kube-apiserver, through a real hub and agent (OS processes) and real chisel, with
the agent running as a ServiceAccount that has exactly the RBAC ``charts/otterscale-agent``
renders by default: it may impersonate *any* group, ``system:masters`` included, so nothing but
the identity rule stands between a padded token and cluster-admin. Go's HTTP stack trims header
values, so before the rule a group ``" system:masters"`` reached kube-apiserver as
``system:masters`` and a subject ``"alice "`` as ``alice``.

Tokens come from :class:`~otterscale.testing.LocalIssuer`, so a test can put any claim in them.
Every refusal here is checked for its code (what a client sees), for naming the claim or header,
and for never repeating the value.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format

from otterscale.common import (
    GROUPS_HEADER,
    SIGNATURE_HEADER,
    SUBJECT_HEADER,
    TIMESTAMP_HEADER,
    Identity,
    derive_identity_key,
    sign_identity,
)
from otterscale.resource.v1 import resource_pb2 as pb

from .conftest import CHART_RBAC_CLUSTER, TEAM, ChartRbacSystem

pytestmark = [pytest.mark.e2e, pytest.mark.security]

GET = "/otterscale.resource.v1.ResourceService/Get"


def crown_jewels(stack: ChartRbacSystem) -> pb.GetRequest:
    """The Secret in kube-system only a cluster-admin (system:masters) may read."""
    return pb.GetRequest(
        cluster=CHART_RBAC_CLUSTER,
        version="v1",
        resource="secrets",
        namespace="kube-system",
        name=stack.crown_jewels,
    )


def visible(stack: ChartRbacSystem) -> pb.GetRequest:
    return pb.GetRequest(
        cluster=CHART_RBAC_CLUSTER,
        version="v1",
        resource="configmaps",
        namespace=stack.namespace,
        name="visible",
    )


def self_review() -> pb.CreateRequest:
    """A SelfSubjectReview: kube-apiserver answers who it thinks the caller is."""
    manifest = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    return pb.CreateRequest(
        cluster=CHART_RBAC_CLUSTER,
        group="authentication.k8s.io",
        version="v1",
        resource="selfsubjectreviews",
        manifest=json.dumps(manifest).encode(),
    )


def test_the_agent_may_impersonate_system_masters(stack: ChartRbacSystem) -> None:
    """The premise: with the chart's default RBAC only the identity rule protects the cluster."""
    review = stack.control_plane.request(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": f"system:serviceaccount:{stack.namespace}:{stack.service_account}",
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "resourceAttributes": {"verb": "impersonate", "resource": "groups", "name": "system:masters"},
            },
        },
    )
    assert review["status"]["allowed"] is True


# (test id, subject, groups, extra claims, what the refusal names). Each row is one hostile token;
# the client must see unauthenticated for all of them, whatever it asks for.
HOSTILE_TOKENS: list[tuple[str, str, tuple[str, ...], dict[str, Any], str]] = [
    ("group-leading-space-masters", "mallory", (" system:masters",), {}, "claim 'groups'"),
    ("group-trailing-space-masters", "mallory", ("system:masters ",), {}, "claim 'groups'"),
    ("group-tab-masters", "mallory", ("\tsystem:masters",), {}, "claim 'groups'"),
    ("group-newline-masters", "mallory", ("system:masters\n",), {}, "claim 'groups'"),
    ("group-upper-case-masters", "mallory", ("SYSTEM:MASTERS",), {}, "claim 'groups'"),
    ("group-zero-width-space", "mallory", (TEAM + "\u200b",), {}, "claim 'groups'"),
    ("group-nbsp", "mallory", ("oidc:team\u00a0a",), {}, "claim 'groups'"),
    ("group-plain-space", "mallory", ("oidc:team a",), {}, "claim 'groups'"),
    ("subject-leading-space-controller-manager", " system:kube-controller-manager", (), {}, "claim 'sub'"),
    ("subject-trailing-space-alice", "alice ", (), {}, "claim 'sub'"),
    ("subject-zero-width-space", "ali\u200bce", (), {}, "claim 'sub'"),
    ("subject-right-to-left-override", "\u202eecila", (), {}, "claim 'sub'"),
    ("subject-ideographic-space", "alice\u3000", (), {}, "claim 'sub'"),
    ("subject-nbsp", "\u00a0alice", (), {}, "claim 'sub'"),
    ("subject-tab", "alice\t", (), {}, "claim 'sub'"),
    ("subject-reserved", "system:admin", (), {}, "claim 'sub'"),
    ("id-token", "alice", (TEAM,), {"typ": "ID"}, "ID tokens are not accepted"),
    ("refresh-token-type", "alice", (TEAM,), {"typ": "Refresh"}, "refresh tokens are not accepted"),
    ("no-token-type", "alice", (TEAM,), {"typ": None}, "does not say it is an access token"),
    ("string-exp", "alice", (TEAM,), {"exp": str(int(time.time()) + 3600)}, "claim exp must be a number"),
    ("string-iat", "alice", (TEAM,), {"iat": str(int(time.time()))}, "claim iat must be a number"),
]


@pytest.mark.parametrize(
    ("subject", "groups", "claims", "names"),
    [row[1:] for row in HOSTILE_TOKENS],
    ids=[row[0] for row in HOSTILE_TOKENS],
)
async def test_hostile_tokens_are_unauthenticated_before_kubernetes(
    stack: ChartRbacSystem, subject: str, groups: tuple[str, ...], claims: dict[str, Any], names: str
) -> None:
    token = stack.token(subject, groups, **claims)
    client, http = stack.client()
    try:
        for request in (crown_jewels(stack), visible(stack)):
            with pytest.raises(ConnectError) as caught:
                await client.get(request, headers={"authorization": f"Bearer {token}"})
            assert caught.value.code is Code.UNAUTHENTICATED, caught.value.message
            assert names in caught.value.message
            assert "masters" not in caught.value.message
            assert "alice" not in caught.value.message
        with pytest.raises(ConnectError) as review:
            await client.create(self_review(), headers={"authorization": f"Bearer {token}"})
        assert review.value.code is Code.UNAUTHENTICATED
    finally:
        await client.close()
        await http.aclose()


async def test_a_correctly_named_group_still_works(stack: ChartRbacSystem) -> None:
    """RBAC bound to the ``oidc:``-prefixed group grants access; kube-apiserver sees exactly the
    token's subject and group; a group without a binding is refused by RBAC, not by the hub."""
    client, http = stack.client()
    try:
        token = stack.token("alice", (TEAM,))
        got = await client.get(visible(stack), headers={"authorization": f"Bearer {token}"})
        assert json_format.MessageToDict(got.object)["data"] == {"a": "b"}
        review = await client.create(self_review(), headers={"authorization": f"Bearer {token}"})
        user = json_format.MessageToDict(review.object)["status"]["userInfo"]
        assert user["username"] == "alice"
        assert set(user["groups"]) == {TEAM, "system:authenticated"}
        # An RFC 9068 access token (typ in the header, no Keycloak typ claim) works too.
        at_jwt = stack.token("alice", (TEAM,), typ=None, header_type="at+jwt")
        assert (await client.get(visible(stack), headers={"authorization": f"Bearer {at_jwt}"})).object
        other = stack.token("alice", ("oidc:team-b",))
        with pytest.raises(ConnectError) as denied:
            await client.get(visible(stack), headers={"authorization": f"Bearer {other}"})
        assert denied.value.code is Code.PERMISSION_DENIED
        assert 'User "alice"' in denied.value.message
        with pytest.raises(ConnectError) as jewels:
            await client.get(crown_jewels(stack), headers={"authorization": f"Bearer {token}"})
        assert jewels.value.code is Code.PERMISSION_DENIED
    finally:
        await client.close()
        await http.aclose()


# --------------------------------------------------------------------------------------------------
# Straight to the agent: signed headers (what a hub of an older version, or one whose key leaked,
# could send). The agent applies the same identity rule, and refuses a header given twice.


def unchecked(subject: str, groups: tuple[str, ...] = ()) -> Identity:
    """An Identity built without its checks, to sign what a careless hub might have sent."""
    identity = object.__new__(Identity)
    object.__setattr__(identity, "subject", subject)
    object.__setattr__(identity, "groups", groups)
    return identity


def agent_call(
    stack: ChartRbacSystem, headers: list[tuple[str, str]], body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """One Connect unary JSON call to the agent's own port (HTTP/1.1; headers may repeat)."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.agent.api_port, timeout=30)
    try:
        connection.putrequest("POST", GET)
        for name, value in [
            ("content-type", "application/json"),
            ("connect-protocol-version", "1"),
            *headers,
        ]:
            connection.putheader(name, value)
        data = json.dumps(body).encode()
        connection.putheader("content-length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def signed(stack: ChartRbacSystem, identity: Identity) -> dict[str, str]:
    key = derive_identity_key(CHART_RBAC_CLUSTER, stack.agent.password)
    return sign_identity(identity, cluster=CHART_RBAC_CLUSTER, method=GET, key=key)


def jewels_body(stack: ChartRbacSystem) -> dict[str, Any]:
    return json_format.MessageToDict(crown_jewels(stack))


@pytest.mark.parametrize(
    ("subject", "groups"),
    [
        ("mallory", (" system:masters",)),
        ("mallory", ("system:masters\t",)),
        (" system:kube-controller-manager", ()),
        ("alice ", ()),
        ("ali\u200bce", ()),
        ("mallory", ("team\u3000a",)),
    ],
    ids=[
        "group-space-masters",
        "group-tab-masters",
        "subject-space-kcm",
        "alice-space",
        "zwsp",
        "ideographic",
    ],
)
def test_the_agent_refuses_padded_signed_identities(
    stack: ChartRbacSystem, subject: str, groups: tuple[str, ...]
) -> None:
    status, answer = agent_call(
        stack, list(signed(stack, unchecked(subject, groups)).items()), jewels_body(stack)
    )
    assert (status, answer.get("code")) == (401, "unauthenticated"), answer
    assert "identity headers are invalid" in answer["message"]
    assert "masters" not in answer["message"]


def test_the_agent_serves_a_well_signed_identity(stack: ChartRbacSystem) -> None:
    """The control for the two tests around it: the same call, signed properly, works."""
    body = json_format.MessageToDict(visible(stack))
    status, answer = agent_call(stack, list(signed(stack, Identity("alice", (TEAM,))).items()), body)
    assert status == 200, answer
    assert answer["object"]["metadata"]["name"] == "visible"


@pytest.mark.parametrize("header", [SUBJECT_HEADER, GROUPS_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER])
@pytest.mark.parametrize("second", ["same", "different"])
def test_an_identity_header_sent_twice_is_unauthenticated(
    stack: ChartRbacSystem, header: str, second: str
) -> None:
    """Each signed header twice, the valid value first: an agent that read only the first value
    (``items()`` instead of ``allitems()``) would serve the call; this one must refuse it."""
    headers = signed(stack, Identity("alice", (TEAM,)))
    others = {
        SUBJECT_HEADER: "bob",
        GROUPS_HEADER: "system%3Amasters",
        TIMESTAMP_HEADER: str(int(time.time()) + 1),
        SIGNATURE_HEADER: "v1=" + base64.urlsafe_b64encode(b"\0" * 32).rstrip(b"=").decode(),
    }
    repeated = headers[header] if second == "same" else others[header]
    pairs = [*headers.items(), (header.lower() if second == "same" else header, repeated)]
    body = json_format.MessageToDict(visible(stack))
    status, answer = agent_call(stack, pairs, body)
    assert (status, answer.get("code")) == (401, "unauthenticated"), answer
    assert f"header {header} is given more than once".lower() in answer["message"].lower()
    assert repeated not in answer["message"]
