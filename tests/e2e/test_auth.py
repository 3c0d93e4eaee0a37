"""Who may call, as whom: real Keycloak tokens, each cluster's own RBAC, forged identity headers.

RBAC (conftest ``rbac``): alice may edit in east only, bob in west only, carol (group ops) may
read configmaps in both. The agent impersonates the token's subject, so the Kubernetes error
message names the user the call really ran as: that is what the header tests check.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.cluster.v1 import cluster_pb2
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import KubeAPIError, System, start_system
from otterscale.testing.plugin import KeycloakFactory

from .conftest import Hub, Rbac, all_secrets, remember, secrets_in, subject_of, unique

pytestmark = [pytest.mark.e2e, pytest.mark.security]


def list_configmaps(cluster: str, namespace: str = "default") -> pb.ListRequest:
    return pb.ListRequest(cluster=cluster, version="v1", resource="configmaps", namespace=namespace)


async def test_rbac_differs_per_cluster_and_the_hub_shows_it(hub: Hub, namespace: str) -> None:
    client = hub.client()
    for user, allowed, denied in (("alice", "east", "west"), ("bob", "west", "east")):
        ok = await client.list(list_configmaps(allowed, namespace), headers=hub.auth(user))
        assert ok.resource_version
        with pytest.raises(ConnectError) as caught:
            await client.list(list_configmaps(denied, namespace), headers=hub.auth(user))
        assert caught.value.code is Code.PERMISSION_DENIED
        # The cluster's own message, naming the caller (the token's subject) and the resource.
        assert hub.subject(user) in caught.value.message
        assert "configmaps" in caught.value.message


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic YWxpY2U6YWxpY2UtcGFzc3dvcmQ=", "Bearer not-a-jwt"],
    ids=["absent", "empty", "bearer-only", "bearer-empty", "basic", "garbage"],
)
async def test_no_usable_token_is_unauthenticated(hub: Hub, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    client = hub.client()
    with pytest.raises(ConnectError) as caught:
        await client.list(list_configmaps("east"), headers=headers)
    assert caught.value.code is Code.UNAUTHENTICATED
    with pytest.raises(ConnectError) as listing:
        await hub.clusters_client().list_clusters(cluster_pb2.ListClustersRequest(), headers=headers)
    assert listing.value.code is Code.UNAUTHENTICATED


async def test_a_tampered_token_is_unauthenticated(hub: Hub) -> None:
    token = hub.token("alice")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = hub.subject("bob")  # bob may edit in west: a forged "bob" must not get in
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = remember(f"{header}.{forged_payload}.{signature}")
    with pytest.raises(ConnectError) as caught:
        await hub.client().list(list_configmaps("west"), headers={"authorization": f"Bearer {forged}"})
    assert caught.value.code is Code.UNAUTHENTICATED


async def test_only_keycloaks_access_tokens_open_the_api(hub: Hub) -> None:
    """Keycloak's ID token carries the same issuer and, as audience, the client: without the
    token-type check it opened the API. Its refresh token is refused by name too."""
    response = hub.keycloak.token_response("alice")
    access, id_token, refresh = (
        remember(response[key]) for key in ("access_token", "id_token", "refresh_token")
    )
    claims = json.loads(base64.urlsafe_b64decode(id_token.split(".")[1] + "=="))
    assert claims["aud"] == hub.keycloak.client_id  # what made it a usable bearer token before
    client = hub.client()
    listed = await client.list(list_configmaps("east"), headers={"authorization": f"Bearer {access}"})
    assert listed.resource_version
    for token, reason in (
        (id_token, "ID tokens are not accepted"),
        (refresh, "refresh tokens are not accepted"),
    ):
        with pytest.raises(ConnectError) as caught:
            await client.list(list_configmaps("east"), headers={"authorization": f"Bearer {token}"})
        assert caught.value.code is Code.UNAUTHENTICATED
        assert reason in caught.value.message
        assert token not in caught.value.message


async def test_a_token_for_another_audience_is_unauthenticated(hub: Hub) -> None:
    other = hub.token("alice", client_id=hub.keycloak.other_client_id)
    assert subject_of(other) == hub.subject("alice")  # same user, same realm, other audience
    client = hub.client()
    with pytest.raises(ConnectError) as caught:
        await client.list(list_configmaps("east"), headers={"authorization": f"Bearer {other}"})
    assert caught.value.code is Code.UNAUTHENTICATED
    assert other not in caught.value.message


async def test_unknown_cluster_is_not_found_but_only_for_a_caller_with_a_token(hub: Hub) -> None:
    client = hub.client()
    for unknown in ("north", "EAST", "east ", "../east", "east/west"):
        with pytest.raises(ConnectError) as caught:
            await client.list(list_configmaps(unknown), headers=hub.auth("alice"))
        assert caught.value.code is Code.NOT_FOUND, unknown
    assert "north" in caught.value.message or "east/west" in caught.value.message
    with pytest.raises(ConnectError) as anonymous:
        await client.list(list_configmaps("north"))
    assert anonymous.value.code is Code.UNAUTHENTICATED  # no cluster enumeration without a token
    with pytest.raises(ConnectError) as empty:
        await client.list(list_configmaps(""), headers=hub.auth("alice"))
    assert empty.value.code is Code.INVALID_ARGUMENT


FORGED_HEADERS = {
    "X-Otterscale-Subject": "{bob}",
    "X-Otterscale-Groups": "system:masters",
    "X-Otterscale-Timestamp": "{now}",
    "X-Otterscale-Signature": "AAAA",
    "Impersonate-User": "{bob}",
    "Impersonate-Group": "system:masters",
    "Impersonate-Uid": "{bob}",
}


@pytest.mark.parametrize("transport", ["connect-h1", "grpc-h2c", "grpcweb-h1"])
async def test_client_sent_identity_headers_are_ignored(hub: Hub, namespace: str, transport: str) -> None:
    """alice's token with headers claiming bob (or system:masters): the call still runs as alice."""
    bob = hub.subject("bob")
    forged = {k: v.format(bob=bob, now=int(time.time())) for k, v in FORGED_HEADERS.items()}
    client = hub.client(transport)
    headers = hub.auth("alice", **forged)
    # In west only bob may list: as alice (what really happens) it is denied, naming alice.
    with pytest.raises(ConnectError) as caught:
        await client.list(list_configmaps("west", namespace), headers=headers)
    assert caught.value.code is Code.PERMISSION_DENIED
    assert hub.subject("alice") in caught.value.message
    assert bob not in caught.value.message
    # In east bob may not list, alice may: it works, so it ran as alice (not as bob).
    listed = await client.list(list_configmaps("east", namespace), headers=headers)
    assert listed.resource_version
    # And no header made anyone cluster-admin: alice still cannot read cluster-scoped RBAC.
    with pytest.raises(ConnectError) as rbac:
        await client.list(
            pb.ListRequest(
                cluster="east", group="rbac.authorization.k8s.io", version="v1", resource="clusterroles"
            ),
            headers=headers,
        )
    assert rbac.value.code is Code.PERMISSION_DENIED


async def test_a_configured_cluster_whose_agent_never_connected_is_unavailable(hub: Hub) -> None:
    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        await hub.client().list(list_configmaps("south"), headers=hub.auth("alice"))
    assert caught.value.code is Code.UNAVAILABLE
    assert "south" in caught.value.message
    assert time.monotonic() - started < 1.0  # decided from the hub's state, no probe per request
    clusters = await hub.list_clusters()
    assert not clusters["south"].connected
    assert not clusters["south"].agent_version
    assert clusters["south"].tunnel_port == hub.system.clusters["south"].tunnel_port


async def test_list_clusters_needs_a_token_and_shows_every_cluster(hub: Hub) -> None:
    # The hub asks a newly connected agent for its versions right after the tunnel opens: give
    # it a moment in case an earlier test just restarted an agent.
    deadline = time.monotonic() + 10
    while True:
        clusters = await hub.list_clusters("carol")
        online = {name: clusters[name] for name in ("east", "west")}
        if all(c.agent_version for c in online.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert sorted(clusters) == ["east", "south", "west"]
    assert not clusters["south"].connected
    for name, cluster in online.items():
        assert cluster.connected, f"{name}: {cluster.last_error}"
        assert cluster.tunnel_port == hub.system.clusters[name].tunnel_port
        assert cluster.kubernetes_version.startswith("v1.")
        assert cluster.agent_version
        assert cluster.HasField("since")


LIFESPAN = 5  # seconds: Keycloak's access token lifespan of the short-lived realm


async def test_an_expired_token_is_unauthenticated(
    keycloak_factory: KeycloakFactory, otterscale_system: System, rbac: Rbac, tmp_path: Path
) -> None:
    """A token works until its ``exp`` and not after (a hub with no clock leeway, its own Keycloak)."""
    short = keycloak_factory("short-lived", access_token_lifespan=LIFESPAN)
    east = otterscale_system.clusters["east"].control_plane
    assert east is not None
    system = start_system(
        tmp_path / "expiry",
        {"east": east},
        realm_url=short.realm_url,
        client_id=short.client_id,
        keycloak_options={"leeway_seconds": 0},
    )
    binding = f"e2e-expiry-{unique('alice')}"
    try:
        token = short.token("alice")
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["exp"] - claims["iat"] == LIFESPAN
        east.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": binding},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "e2e-reader",
                },
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": claims["sub"]}
                ],
            }
        )
        hub = Hub(system, short, rbac=None)  # type: ignore[arg-type]
        try:
            client = hub.client()
            headers = {"authorization": f"Bearer {token}"}
            failed_at = None
            worked = 0
            while time.time() < claims["exp"] + 10:
                try:
                    await client.list(list_configmaps("east"), headers=headers)
                    worked += 1
                except ConnectError as exc:
                    if exc.code is Code.UNAUTHENTICATED:
                        failed_at = time.time()
                        break
                    raise
                await asyncio.sleep(0.2)
            assert worked, "the fresh token never worked"
            assert failed_at is not None, "the token still works 10 s after it expired"
            assert failed_at >= claims["exp"], "the token stopped working before it expired"
            with pytest.raises(ConnectError) as caught:
                await hub.clusters_client().list_clusters(cluster_pb2.ListClustersRequest(), headers=headers)
            assert caught.value.code is Code.UNAUTHENTICATED
            # A new token of the same user works again at once.
            fresh = short.token("alice")
            listed = await client.list(list_configmaps("east"), headers={"authorization": f"Bearer {fresh}"})
            assert listed.resource_version
        finally:
            await hub.aclose()
        leaked = secrets_in(system.logs(), {"token": token, "fresh token": fresh, "seed": system.key_seed})
        assert not leaked
    finally:
        system.stop()
        with contextlib.suppress(KubeAPIError):
            east.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{binding}")
        short.stop()


async def test_no_secret_in_any_log(hub: Hub, otterscale_system: System) -> None:
    """The calls most likely to leak (refused tokens, forged identity headers) leave no secret in
    any log; every token issued so far in the session is checked too (and again at session end)."""
    client = hub.client()
    good = hub.token("alice")
    wrong_audience = hub.token("alice", client_id=hub.keycloak.other_client_id)
    header, payload, _ = good.split(".")
    bad_signature = remember(f"{header}.{payload}.{'A' * 342}")
    for token in (good, wrong_audience, bad_signature, good + "x"):
        remember(token)
        await _code(client.list(list_configmaps("west"), headers={"authorization": f"Bearer {token}"}))
        await _code(client.list(list_configmaps("north"), headers={"authorization": f"Bearer {token}"}))
    await _code(
        client.list(list_configmaps("east"), headers=hub.auth("alice", **{"X-Otterscale-Subject": good}))
    )
    logs = otterscale_system.logs()
    assert sum(len(text) for text in logs.values()) > 0
    assert any("rpc unauthenticated" in text for text in logs.values())  # the refusals were logged
    leaked = secrets_in(logs, all_secrets(otterscale_system, hub.keycloak))
    assert not leaked, f"secrets found in {otterscale_system.directory}: {leaked}"


async def _code(call: Awaitable[object]) -> Code | None:
    try:
        await call
    except ConnectError as exc:
        return exc.code
    return None
