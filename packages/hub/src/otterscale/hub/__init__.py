"""otterscale-hub: the authenticated front door of OtterScale.

The hub serves ``otterscale.resource.v1.ResourceService`` to users (Connect, gRPC and gRPC-Web
over HTTP/1.1 and h2c), verifies their OIDC bearer tokens, and forwards each call to the agent
of the cluster it names through that agent's chisel reverse tunnel, with signed identity
headers. It also serves ``otterscale.cluster.v1.ClusterService`` (cluster status), gRPC health
and reflection, and Prometheus metrics at ``/metrics``. Several replicas elect a leader over a
Kubernetes Lease (:class:`ElectionSettings`, ``--leader-elect``): the leader runs the tunnel
server, the others forward every call to it.

Run it with ``otterscale server`` (or ``otterscale-hub``): a small launcher that starts Envoy
with the hub inside (:class:`Hub`, served by pyvoy as ``otterscale.hub._hosted:app``).

Only the names in ``__all__`` are public; the underscore modules may change at any time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from otterscale.common import lazy_exports

if TYPE_CHECKING:
    from ._cli import hub_version, main
    from ._hub import Hub, HubSettings
    from ._lease import ElectionSettings

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ElectionSettings": "._lease",
        "Hub": "._hub",
        "HubSettings": "._hub",
        "hub_version": "._cli",
        "main": "._cli",
    },
)

__all__ = ["ElectionSettings", "Hub", "HubSettings", "hub_version", "main"]
