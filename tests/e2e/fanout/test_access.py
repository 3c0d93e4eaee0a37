"""The ``access`` allow-lists hold for single-cluster calls too (fanout.md 3.2): a cluster a caller
may not use is, through ResourceService and ClusterService as through MultiClusterService,
exactly a cluster that does not exist. (Each cluster's RBAC still decides what an allowed
caller may do there.)"""

from __future__ import annotations

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.cluster.v1.cluster_pb2 import ListClustersRequest
from otterscale.resource.v1 import resource_pb2 as pb

from .conftest import CLUSTERS, Clients, Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.security]


async def _list_error(clients: Clients, fleet: Fleet, user: str, cluster: str) -> ConnectError:
    request = pb.ListRequest(cluster=cluster, version="v1", resource="configmaps", namespace="team-a")
    with pytest.raises(ConnectError) as caught:
        await clients.resources().list(request, headers=fleet.auth(user))
    return caught.value


async def test_a_cluster_the_caller_may_not_use_is_not_found_like_one_that_does_not_exist(
    fleet: Fleet, clients: Clients
) -> None:
    forbidden = await _list_error(clients, fleet, "bob", "c-none")
    unknown = await _list_error(clients, fleet, "bob", "zz-none")
    assert forbidden.code is unknown.code is Code.NOT_FOUND
    assert forbidden.message == unknown.message.replace("zz-none", "c-none")
    # alice may use c-none: there its own RBAC answers (she has no binding: permission_denied).
    assert (await _list_error(clients, fleet, "alice", "c-none")).code is Code.PERMISSION_DENIED
    # bob may use a-full, where his RBAC lets him list.
    listed = await clients.resources().list(
        pb.ListRequest(cluster="a-full", version="v1", resource="configmaps", namespace="team-a"),
        headers=fleet.auth("bob"),
    )
    assert listed.items


async def test_an_empty_cluster_names_only_the_callers_clusters(fleet: Fleet, clients: Clients) -> None:
    error = await _list_error(clients, fleet, "bob", "")
    assert error.code is Code.INVALID_ARGUMENT
    assert error.message.endswith("configured clusters: a-full")


async def test_list_clusters_shows_only_the_callers_clusters(fleet: Fleet, clients: Clients) -> None:
    client = clients.clusters()

    async def names(user: str) -> list[str]:
        response = await client.list_clusters(ListClustersRequest(), headers=fleet.auth(user))
        return [cluster.name for cluster in response.clusters]

    assert await names("alice") == sorted(CLUSTERS)
    assert await names("bob") == ["a-full"]
    assert await names("carol") == []
