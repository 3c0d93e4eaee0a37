"""The hub: tunnel server, agent connections, the API, leadership, and their lifecycle.

:meth:`Hub.start` checks chisel, starts the tunnel server (the authfile is written first), logs
its fingerprint and bind address, starts serving and the prober, and returns when the hub
answers. Nothing contacts the identity provider at start-up: the hub starts while Keycloak is
down, and tokens fail with unavailable until it is back.

With leader election (``HubSettings.election``, ``--leader-elect``) the hub starts serving at
once as a follower (ready, no tunnel server) and campaigns for the Lease. A role task follows
the leadership:

- on gaining it: start the tunnel server (a replica that cannot start it steps down, releasing
  the Lease so another takes over), serve ResourceService and ClusterService itself, start the
  prober, then label its own Pod as the leader (the tunnel Service selects that label);
- on losing it: forward calls again, end the Watches it served with unavailable, stop the
  prober, unlabel its Pod and stop the tunnel server (sessions closed, ports freed).

A follower forwards every ResourceService and ClusterService call to the leader
(:mod:`._forward`); ``/metrics``, ``/readyz``, health and reflection are always answered by the
replica itself.

:meth:`Hub.stop` shuts down in order, each step bounded: stop reporting ready (health
NOT_SERVING), refuse new Watches and end the open ones with unavailable, stop accepting
connections and let calls in flight finish within the drain deadline, stop the prober, stop the
tunnel server (a leader also unlabels its Pod), release the Lease (a successor takes over at
once instead of after the lease expires), close the agent connections and the verifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connectrpc.compression.gzip import GzipCompression

from otterscale.cluster.v1 import cluster_pb2
from otterscale.cluster.v1.cluster_connect import ClusterServiceASGIApplication
from otterscale.common import (
    ASGIApp,
    ChiselBinary,
    ChiselServer,
    ChiselServerEvent,
    OIDCVerifier,
    OtterscaleConfig,
    OtterscaleError,
    TunnelUser,
    check_chisel,
    create_listener,
    derive_identity_key,
    serve,
)
from otterscale.resource.v1 import multicluster_pb2, resource_pb2
from otterscale.resource.v1.multicluster_connect import MultiClusterServiceASGIApplication
from otterscale.resource.v1.resource_connect import ResourceServiceASGIApplication

from ._auth import Authenticator
from ._clusters import ClusterServiceImpl
from ._codec import CODEC_JSON, CODEC_PROTO, PassthroughCodec
from ._cors import with_cors
from ._election import ElectionSettings
from ._errors import HubError
from ._fanout import Fanout
from ._forward import LeaderForwarder
from ._health import HealthASGIApplication, HealthService, health_file
from ._leader import KubernetesLeadership, Leadership
from ._limits import BoundedGzipCompression, ClientLimits, HubLimits
from ._metrics import HubMetrics
from ._observe import ObservingInterceptor
from ._proxy import ResourceProxy
from ._reflection import reflection_apps
from ._server import Router, Switch
from ._tasks import cancel_and_wait, spawn
from ._tunnels import Tunnels
from ._upstream import AgentClients

logger = logging.getLogger(__name__)

#: A leader whose tunnel server has been down this long (it keeps dying) steps down.
TUNNEL_DOWN_STEP_DOWN = 15.0


def hub_version() -> str:
    """The installed otterscale-hub version."""
    try:
        return importlib.metadata.version("otterscale-hub")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "unknown"


@dataclass(frozen=True, slots=True)
class HubSettings:
    """Everything the hub needs, built once by the command line (or a test) and passed down.

    ``host``/``port`` is the API listen address ("" = all interfaces; 0 = any free port).
    ``chisel`` is the chisel binary (None: ``chisel`` on PATH). ``drain_timeout`` bounds how long
    calls in flight may take after shutdown starts. The prober pings every agent every
    ``probe_interval`` seconds and waits ``probe_timeout`` for the answer. ``election`` turns
    leader election on (None: the hub runs alone and always leads); it needs a fixed ``port``,
    which followers use to reach the leader. The limits on clients (request and answer sizes,
    Watches per subject, slow Watch clients) come from ``config.limits`` (see ``_limits``).
    """

    config: OtterscaleConfig
    host: str = ""
    port: int = 8299
    chisel: str | None = None
    drain_timeout: float = 10.0
    probe_interval: float = 5.0
    probe_timeout: float = 2.0
    chisel_keepalive: float = 10.0
    election: ElectionSettings | None = None


class Hub:
    """One running hub (see the module docstring). Use ``async with`` or start()/stop().

    ``leadership`` replaces the Kubernetes leader election of ``settings.election`` (tests).
    """

    def __init__(self, settings: HubSettings, *, leadership: Leadership | None = None) -> None:
        self.settings = settings
        if leadership is None and settings.election is not None:
            leadership = KubernetesLeadership(settings.election, port=settings.port)
        self.leadership = leadership
        self._elected = leadership is not None
        # Without leader election the hub always serves itself (it "leads" alone).
        self._leading = not self._elected
        self._forwarder: LeaderForwarder | None = None
        self._binary: ChiselBinary | None = None
        self._last_fingerprint: str | None = None
        self._role_changed = asyncio.Event()
        self._role_task: asyncio.Task[None] | None = None
        self._mark_task: asyncio.Task[None] | None = None
        self._tunnel_down_since: float | None = None
        self._campaigning = False
        config = settings.config
        self._clusters: Mapping[str, Any] = config.clusters
        #: What the hub accepts from and holds for clients (``limits`` in otterscale.yaml).
        self.limits = HubLimits.from_config(config.limits)
        self._keys = {
            name: derive_identity_key(name, cluster.agent.auth.password.get_secret_value())
            for name, cluster in config.clusters.items()
        }
        self.metrics: HubMetrics | None = None
        self.tunnels: Tunnels | None = None
        self.chisel: ChiselServer | None = None
        self._agents: AgentClients | None = None
        self._auth: Authenticator | None = None
        self._proxy: ResourceProxy | None = None
        self._fanout: Fanout | None = None
        self._health: HealthService | None = None
        self._shutdown = asyncio.Event()
        self._serving = asyncio.Event()
        self._server_task: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._info_session: dict[str, int | None] = {}
        self._stopper: asyncio.Task[None] | None = None
        self._draining = False
        self.port: int | None = None
        self.started_in: float | None = None

    # ----------------------------------------------------------------------------------------------
    # Public state

    @property
    def url(self) -> str:
        """``http://<host>:<port>`` of the API (loopback when listening on all interfaces)."""
        host = self.settings.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def fingerprint(self) -> str | None:
        """The tunnel server's SHA256 fingerprint (agents put it in their configuration).

        With leader election every replica knows it from start-up (it depends only on the key).
        """
        if self.chisel is not None and self.chisel.fingerprint is not None:
            return self.chisel.fingerprint
        return self._last_fingerprint

    @property
    def leading(self) -> bool:
        """Whether this replica serves the API itself (always, without leader election)."""
        return self._leading

    @property
    def role(self) -> str:
        """``standalone`` (no leader election), ``leader`` or ``follower``."""
        if not self._elected:
            return "standalone"
        return "leader" if self._leading else "follower"

    @property
    def root_tasks(self) -> list[asyncio.Task[Any]]:
        """Tasks that must run as long as the hub (the server, leadership); one ending is a failure."""
        tasks: list[asyncio.Task[Any]] = []
        if self._server_task is not None:
            tasks.append(self._server_task)
        if self._role_task is not None:
            tasks.append(self._role_task)
        if self.leadership is not None and self._role_task is not None:
            tasks.extend(self.leadership.tasks())
        return tasks

    @property
    def server_task(self) -> asyncio.Task[None]:
        """The task serving HTTP; it ends when the server stops (or fails)."""
        if self._server_task is None:
            raise RuntimeError("the hub was not started")
        return self._server_task

    def ready(self) -> bool:
        """Serving, not shutting down, and the tunnel server up unless a follower (``/readyz``)."""
        return self._serving.is_set() and not self._draining and self._serves_api()

    def _serves_api(self) -> bool:
        """A follower always can (it forwards); a leader (or a lone hub) needs its tunnel server."""
        if self._elected and not self._leading:
            return True
        return self.tunnels is not None and self.tunnels.server_up

    # ----------------------------------------------------------------------------------------------
    # Lifecycle

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start everything; raise (with nothing left running) if the hub cannot start."""
        started = time.perf_counter()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self.started_in = time.perf_counter() - started
        logger.info(
            "hub ready at %s (started in %.0f ms)",
            self.url,
            self.started_in * 1000,
            extra={"address": self.url, "clusters": len(self._clusters)},
        )

    async def _start(self) -> None:
        settings = self.settings
        config = settings.config
        if self._elected and settings.port == 0:
            raise HubError(
                "leader election needs a fixed --address port: followers forward calls to the leader's"
            )
        self._binary = binary = await asyncio.to_thread(check_chisel, settings.chisel)
        names = sorted(config.clusters)
        self.metrics = metrics = HubMetrics(names, version=hub_version(), chisel_version=binary.version_text)
        self.tunnels = tunnels = Tunnels(
            {name: (c.agent.tunnel_port, c.agent.auth.user) for name, c in config.clusters.items()},
            metrics,
            on_tunnel_open=self.probe_soon,
        )
        self._agents = AgentClients(
            {name: c.agent.tunnel_port for name, c in config.clusters.items()},
            self._keys,
            max_response_bytes=self.limits.max_response_bytes,
        )
        self._auth = authenticator = Authenticator(OIDCVerifier.from_config(config.keycloak))
        self._proxy = ResourceProxy(
            authenticator=authenticator,
            tunnels=tunnels,
            agents=self._agents,
            keys=self._keys,
            metrics=metrics,
            limits=self.limits,
            on_unreachable=self.probe_soon,
        )
        self._fanout = Fanout(
            config,
            authenticator=authenticator,
            tunnels=tunnels,
            agents=self._agents,
            keys=self._keys,
            metrics=metrics,
            limits=self.limits,
            watch_slots=self._proxy.watch_slots,
            on_unreachable=self.probe_soon,
        )
        self._health = HealthService(tunnels, serving=self.ready, resources_serving=self._serves_api)
        if self.leadership is not None:
            self._forwarder = LeaderForwarder(self.leadership, metrics)
        router = self._router(metrics)

        if not self._elected:
            await self._start_tunnel_server()
            metrics.leader.set(1)
        else:
            # Only the leader runs the tunnel server, but every replica checks the key now (a
            # replica that cannot use it would otherwise win, fail and step down, again and
            # again) and logs the fingerprint, which operators copy into the agents' settings.
            self._last_fingerprint = fingerprint = await _probe_fingerprint(binary, config)
            logger.info(
                "tunnel fingerprint %s (this replica runs the tunnel server on %s:%d while it leads)",
                fingerprint,
                config.tunnel.server.host,
                config.tunnel.server.port,
                extra={"fingerprint": fingerprint},
            )

        try:
            sock = create_listener(settings.host, settings.port)
        except OSError as exc:
            raise HubError(
                f"cannot listen on {settings.host or '*'}:{settings.port}: {exc.strerror or exc}"
            ) from exc
        self.port = sock.getsockname()[1]
        self._server_task = spawn(
            serve(router, sock, self._shutdown, graceful_timeout=settings.drain_timeout), name="hub-server"
        )
        serving = asyncio.ensure_future(self._serving.wait())
        try:
            await asyncio.wait(
                {serving, self._server_task}, timeout=15.0, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            serving.cancel()
        if not self._serving.is_set():
            if self._server_task.done() and self._server_task.exception() is not None:
                raise RuntimeError("the HTTP server failed to start") from self._server_task.exception()
            raise RuntimeError("the HTTP server did not start within 15s")
        if self.leadership is None:
            self._prober = spawn(self._probe_loop(), name="hub-prober")
            return
        logger.info("leader election on: serving as a follower until this replica leads")
        self._campaigning = True
        await self.leadership.start(self._leadership_changed)
        self._role_task = spawn(self._role_loop(), name="hub-role")

    def _new_chisel(self) -> ChiselServer:
        assert self._binary is not None
        config = self.settings.config
        server = config.tunnel.server
        return ChiselServer(
            self._binary,
            host=server.host,
            port=server.port,
            users=[
                TunnelUser(
                    user=c.agent.auth.user,
                    password=c.agent.auth.password.get_secret_value(),
                    port=c.agent.tunnel_port,
                )
                for c in config.clusters.values()
            ],
            key_seed=server.key_seed.get_secret_value() if server.key_seed is not None else None,
            key_file=server.key_file,
            keepalive_seconds=self.settings.chisel_keepalive,
            on_event=self._chisel_event,
            on_restart=self._chisel_restarted,
        )

    async def _start_tunnel_server(self) -> None:
        """Start chisel (a new process each time); raise with chisel's own words if it cannot."""
        assert self._binary is not None
        server = self.settings.config.tunnel.server
        self.chisel = chisel = self._new_chisel()
        await chisel.start()
        self._last_fingerprint = chisel.fingerprint
        logger.info(
            "tunnel server (chisel %s) listening on %s:%d, fingerprint %s",
            self._binary.version_text,
            server.host,
            server.port,
            chisel.fingerprint,
            extra={"fingerprint": chisel.fingerprint, "tunnel_address": f"{server.host}:{server.port}"},
        )

    async def _stop_tunnel_server(self) -> None:
        chisel = self.chisel
        if chisel is not None:
            try:
                await chisel.stop()
            finally:
                if self.chisel is chisel:
                    self.chisel = None

    def _router(self, metrics: HubMetrics) -> ASGIApp:
        assert self._proxy is not None
        assert self._health is not None
        assert self._auth is not None
        assert self.tunnels is not None
        interceptors = (ObservingInterceptor(metrics),)
        max_request = self.limits.max_request_bytes
        refusals = metrics.limit_refusals

        def refused(reason: str) -> None:
            refusals.labels(reason=reason).inc()

        # gzip only when the caller asks for it, at the fastest level: responses can be large
        # (a List of thousands of objects) and the hub should stay close to a plain relay. A
        # compressed request is inflated up to the request limit only.
        gzip = BoundedGzipCompression(level=1, on_refused=refused)
        resource_app = ResourceServiceASGIApplication(
            self._proxy,
            interceptors=interceptors,
            codecs=[PassthroughCodec(CODEC_PROTO), PassthroughCodec(CODEC_JSON)],
            compressions=[gzip],
            # Bounds a compressed request once inflated (ClientLimits bounds the wire bytes).
            read_max_bytes=max_request,
        )
        cluster_app = ClusterServiceASGIApplication(
            ClusterServiceImpl(authenticator=self._auth, tunnels=self.tunnels), interceptors=interceptors
        )
        assert self._fanout is not None
        multi_app = MultiClusterServiceASGIApplication(
            self._fanout.service,  # type: ignore[arg-type]
            interceptors=interceptors,
            codecs=[PassthroughCodec(CODEC_PROTO), PassthroughCodec(CODEC_JSON)],
            compressions=[gzip],
            read_max_bytes=max_request,
        )
        health_app = HealthASGIApplication(self._health, interceptors=interceptors)
        resource: ASGIApp = resource_app  # type: ignore[assignment]
        cluster: ASGIApp = cluster_app  # type: ignore[assignment]
        multi: ASGIApp = multi_app  # type: ignore[assignment]
        if self._forwarder is not None:
            # Followers forward both services to the leader (pass-through codecs, nothing decoded).
            codecs = [PassthroughCodec(CODEC_PROTO), PassthroughCodec(CODEC_JSON)]
            forward_resources = ResourceServiceASGIApplication(
                self._forwarder,  # type: ignore[arg-type]
                interceptors=interceptors,
                codecs=codecs,
                compressions=[gzip],
                read_max_bytes=max_request,
            )
            forward_clusters = ClusterServiceASGIApplication(
                self._forwarder,  # type: ignore[arg-type]
                interceptors=interceptors,
                codecs=codecs,
                compressions=[GzipCompression(level=1)],
            )
            forward_multi = MultiClusterServiceASGIApplication(
                self._forwarder,  # type: ignore[arg-type]
                interceptors=interceptors,
                codecs=codecs,
                compressions=[gzip],
                read_max_bytes=max_request,
            )
            resource = Switch(resource, forward_resources, lambda: self._leading)  # type: ignore[arg-type]
            cluster = Switch(cluster, forward_clusters, lambda: self._leading)  # type: ignore[arg-type]
            multi = Switch(multi, forward_multi, lambda: self._leading)  # type: ignore[arg-type]
        # Request size and slow Watch clients are bounded for leader and follower alike.
        resource = ClientLimits(resource, self.limits, on_refused=refused)
        multi = ClientLimits(multi, self.limits, on_refused=refused)
        services: dict[str, ASGIApp] = {
            _service_name(resource_app.path): resource,
            _service_name(multi_app.path): multi,
            _service_name(cluster_app.path): cluster,
            _service_name(health_app.path): health_app,  # type: ignore[dict-item]
        }
        described = [
            resource_pb2.DESCRIPTOR.services_by_name["ResourceService"],
            multicluster_pb2.DESCRIPTOR.services_by_name["MultiClusterService"],
            cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"],
            health_file().services_by_name["Health"],
        ]
        for app in reflection_apps(described, interceptors=interceptors):
            services[_service_name(app.path)] = app  # type: ignore[assignment]
        router = Router(services, metrics=metrics.render, ready=self.ready, on_startup=self._serving.set)
        return with_cors(router, self.settings.config.cors)  # outermost: before auth, on followers too

    async def stop(self) -> None:
        """Shut down gracefully (see the module docstring); idempotent and bounded."""
        if self._stopper is None:
            self._stopper = asyncio.create_task(self._stop(), name="hub-stop")
        await asyncio.shield(self._stopper)

    async def _stop(self) -> None:
        was_serving = self._serving.is_set()
        self._draining = True
        if was_serving:
            logger.info("hub shutting down: draining (at most %gs)", self.settings.drain_timeout)
        if self._health is not None:
            self._health.close()
        if self._proxy is not None:
            self._proxy.drain()
        if self._fanout is not None:
            self._fanout.drain()
        if self._forwarder is not None:
            self._forwarder.drain()
        self._shutdown.set()
        if self._server_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._server_task), self.settings.drain_timeout + 5.0)
            except TimeoutError:
                logger.warning("the HTTP server did not stop in time; cancelling it")
                await cancel_and_wait([self._server_task])
            except Exception:  # the task's done callback logged it
                logger.debug("the HTTP server ended with an error")
        tasks = [
            task
            for task in (self._role_task, self._mark_task, self._prober, *self._probes.values())
            if task is not None
        ]
        await cancel_and_wait(tasks)
        if self.leadership is not None and self._leading:
            # Unlabel first (agents stop being sent here), in parallel with stopping the tunnels.
            await asyncio.gather(self.leadership.unmark(), self._stop_tunnel_server())
        else:
            await self._stop_tunnel_server()
        if self.leadership is not None and self._campaigning:
            # Only now, with the tunnel server gone, may a successor start its own.
            await self.leadership.close()
        self._set_leading(False)
        if self._agents is not None:
            await self._agents.aclose()
        if self._forwarder is not None:
            await self._forwarder.aclose()
        if self._auth is not None:
            await self._auth.aclose()
        if was_serving:
            logger.info("hub stopped")

    # ----------------------------------------------------------------------------------------------
    # Leadership

    def _leadership_changed(self) -> None:
        """Called (on the loop) when this replica's leadership or the known leader changes."""
        self._role_changed.set()
        if self._forwarder is not None:
            self._forwarder.leader_changed()

    async def _role_loop(self) -> None:
        """Follow the leadership: become the leader or a follower (see the module docstring)."""
        assert self.leadership is not None
        leadership = self.leadership
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._role_changed.wait()
            self._role_changed.clear()
            if self._draining:
                return
            if leadership.leading and not self._leading:
                await self._become_leader()
            elif not leadership.leading and self._leading:
                await self._become_follower()
            elif self._leading:
                await self._check_tunnel_server()

    async def _become_leader(self) -> None:
        assert self.leadership is not None
        started = time.perf_counter()
        try:
            await self._start_tunnel_server()
        except (OtterscaleError, OSError, RuntimeError) as exc:
            logger.error("cannot start the tunnel server as the leader: %s", exc)
            await self._stop_tunnel_server()
            await self.leadership.step_down(f"the tunnel server did not start ({exc})")
            return
        if not self.leadership.leading or self._draining:  # lost it meanwhile
            await self._stop_tunnel_server()
            return
        self._set_leading(True)
        self._tunnel_down_since = None
        self._prober = spawn(self._probe_loop(), name="hub-prober")
        self._mark_task = spawn(self.leadership.mark_leader(), name="hub-leader-label")
        logger.info(
            "serving as the leader (tunnel server started in %.0f ms)",
            (time.perf_counter() - started) * 1000,
            extra={"identity": self.leadership.identity},
        )

    async def _become_follower(self) -> None:
        assert self.leadership is not None
        self._set_leading(False)
        if self._proxy is not None:
            self._proxy.end_streams()
        if self._fanout is not None:
            self._fanout.end_streams()
        tasks = [task for task in (self._mark_task, self._prober, *self._probes.values()) if task is not None]
        await cancel_and_wait(tasks)
        self._mark_task = self._prober = None
        self._probes.clear()
        await asyncio.gather(self.leadership.unmark(), self._stop_tunnel_server())
        logger.info("serving as a follower: calls are forwarded to the leader")

    async def _check_tunnel_server(self) -> None:
        """Step down when the leader's tunnel server stays down (chisel keeps dying)."""
        assert self.leadership is not None
        if self.tunnels is None or self.tunnels.server_up:
            self._tunnel_down_since = None
            return
        now = time.monotonic()
        if self._tunnel_down_since is None:
            self._tunnel_down_since = now
        elif now - self._tunnel_down_since > TUNNEL_DOWN_STEP_DOWN:
            await self.leadership.step_down(
                f"the tunnel server has been down for more than {TUNNEL_DOWN_STEP_DOWN:g}s"
            )
            await self._become_follower()

    def _set_leading(self, leading: bool) -> None:
        if not self._elected or leading == self._leading:
            return
        self._leading = leading
        if self.metrics is not None:
            self.metrics.leader.set(1 if leading else 0)
            self.metrics.leader_transitions.inc()

    # ----------------------------------------------------------------------------------------------
    # Tunnel events and probes

    def _chisel_event(self, event: ChiselServerEvent) -> None:
        # Once the hub is stopping, the tunnel server's own exit is expected, not news.
        if self.tunnels is not None and not self._draining:
            self.tunnels.handle_event(event)

    def _chisel_restarted(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.chisel_restarts.inc()
        logger.warning("tunnel server restarted (%d restarts so far)", count)

    def probe_soon(self, cluster: str) -> None:
        """Probe ``cluster``'s agent now (and ask for its versions), unless a probe is running."""
        running = self._probes.get(cluster)
        if self._draining or (running is not None and not running.done()):
            return
        self._probes[cluster] = spawn(self._probe(cluster, with_info=True), name=f"hub-probe:{cluster}")

    async def _probe_loop(self) -> None:
        """Ping connected agents every interval; the others (chisel reports them) every 4th."""
        assert self.tunnels is not None
        tunnels = self.tunnels
        rounds = 0
        while True:
            await asyncio.sleep(self.settings.probe_interval)
            rounds += 1
            if not tunnels.server_up:
                continue
            names = [status.name for status in tunnels.snapshot() if status.tunnel_up or rounds % 4 == 0]
            await asyncio.gather(*(self._probe(name) for name in names))

    async def _probe(self, cluster: str, *, with_info: bool = False) -> None:
        tunnels, agents = self.tunnels, self._agents
        assert tunnels is not None
        assert agents is not None
        try:
            round_trip = await agents.ping(cluster, within=self.settings.probe_timeout)
        except ConnectionError as exc:
            tunnels.probe_failed(cluster, str(exc))
            return
        tunnels.probe_ok(cluster, round_trip)
        status = tunnels.get(cluster)
        session = status.session if status is not None else None
        if with_info or cluster not in self._info_session or self._info_session[cluster] != session:
            self._info_session[cluster] = session
            await self._agent_info(cluster)

    async def _agent_info(self, cluster: str) -> None:
        tunnels, agents = self.tunnels, self._agents
        assert tunnels is not None
        assert agents is not None
        try:
            info = await agents.agent_info(cluster, within=self.settings.probe_timeout)
        except Exception as exc:  # any failure: versions stay unknown, the next probe asks again
            logger.info("cluster %s: the agent did not report its versions: %s", cluster, exc)
            self._info_session.pop(cluster, None)
            return
        if info is None:
            logger.debug("cluster %s: the agent does not implement AgentService", cluster)
            tunnels.agent_info(cluster, agent_version="", kubernetes_version="")
            return
        agent_version, kubernetes_version = info
        tunnels.agent_info(cluster, agent_version=agent_version, kubernetes_version=kubernetes_version)


def _service_name(path: str) -> str:
    return path.strip("/")


async def tunnel_fingerprint(config: OtterscaleConfig, *, chisel: str | None = None) -> str:
    """The tunnel fingerprint the hub will present with ``config``'s key, without running a hub.

    Starts chisel for a moment on a free loopback port with the configured key (seed or file) and
    a throw-away user, reads the fingerprint it prints, and stops it. Agents need this value in
    ``clusters.<name>.agent.fingerprint``.
    """
    binary = await asyncio.to_thread(check_chisel, chisel)
    return await _probe_fingerprint(binary, config)


async def _probe_fingerprint(binary: ChiselBinary, config: OtterscaleConfig) -> str:
    server = config.tunnel.server
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chisel_server = ChiselServer(
        binary,
        host="127.0.0.1",
        port=port,
        users=[TunnelUser(user="fingerprint-probe", password=secrets.token_urlsafe(24), port=1)],
        key_seed=server.key_seed.get_secret_value() if server.key_seed is not None else None,
        key_file=server.key_file,
    )
    await chisel_server.start()
    try:
        if chisel_server.fingerprint is None:  # pragma: no cover - chisel always prints it first
            raise RuntimeError("chisel did not print its fingerprint")
        return chisel_server.fingerprint
    finally:
        await chisel_server.stop()


async def run_hub(settings: HubSettings, stop: asyncio.Event) -> int:
    """Run a hub until ``stop`` is set (0) or a root task fails (1); always shuts down cleanly."""
    hub = Hub(settings)
    await hub.start()
    status = 0
    try:
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({waiter, *hub.root_tasks}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not stop.is_set():
            ended = next((task.get_name() for task in hub.root_tasks if task.done()), "?")
            logger.error("%s stopped unexpectedly; shutting down", ended)
            status = 1
    finally:
        await hub.stop()
    return status
