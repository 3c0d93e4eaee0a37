"""The hub inside Envoy: :data:`app` is what pyvoy serves for ``otterscale server``.

The command (:mod:`._cli`) starts Envoy with this module's ``app``; everything the hub does runs
here, on pyvoy's one event loop: the configuration is read and checked, :class:`~._hub.Hub` is
built and started (tunnel server, prober, election) before Envoy accepts a connection, and
:func:`otterscale.common.host` drains and stops it (see there). The API is served on the
``--address`` port, ``/metrics`` and the per-cluster health on the management port.

This is the only module of the hub that reads the environment inside Envoy (the election's
``KUBECONFIG`` and ``HOME``, as the command did).
"""

from __future__ import annotations

import logging
import os

from otterscale.common import Hosted, ServeSettings, host, listener_limits, load_config

from ._hub import Hub, HubSettings
from ._lease import ElectionSettings
from ._services import HUB_SERVICES, ROUTED_SERVICES, hub_service, routed_service

logger = logging.getLogger(__name__)


async def _hub(settings: ServeSettings) -> Hosted:
    service = settings.service
    config = load_config(service["config"])
    election = service.get("election")
    hub = Hub(
        HubSettings(
            config=config,
            host=settings.api[0],
            port=settings.api[1],
            chisel=service.get("chisel"),
            drain_timeout=settings.drain_timeout,
            election=ElectionSettings(**election, environ=dict(os.environ)) if election else None,
            routed_services=(
                *ROUTED_SERVICES,
                *(routed_service(spec) for spec in service.get("routed_services", ())),
            ),
            hub_services=(*HUB_SERVICES, *(hub_service(spec) for spec in service.get("hub_services", ()))),
        ),
    )
    streaming, request_streaming = hub.streaming()
    return Hosted(
        service=hub,
        api=hub.api_app,
        management=hub.management_app,
        limits=listener_limits(config.limits, hub=True),
        streaming=streaming,
        request_streaming=request_streaming,
        stream_send_timeout=hub.limits.watch_send_timeout,
        on_refused=hub.refused,
    )


#: The ASGI application pyvoy loads (``otterscale.hub._hosted:app``).
app = host(_hub)
