"""Leader election against a real kube-apiserver: the Lease, its hand-over, the leader's address.

The candidates are the hub's Lease machinery (``KubernetesLeadership``) on their own, in the
test's process: no HTTP server is involved. Each test gets its own namespace in the session's
control plane, and candidates with short timings (lease 4 s, renew 3 s, retry 1 s) so that expiry
is quick to observe. Pods exist (no kubelet: their status, with the Pod IP, is written as admin),
so the Pod-IP lookup is real. What a candidate did is read from kube-apiserver (the Lease, the
labels) or from its log; a candidate that must lose the API server reaches it through a
:class:`~otterscale.testing.BlackHoleRelay` (frozen: no answer; closed: gone, as after kill -9).
Where a test shows that something happens "at once", the candidates poll rarely (every 10 s), so
that at once (woken by the Lease watch) and at the next poll are seconds apart, not milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from kubernetes.aio import client
from kubernetes.aio import config as kube_config
from kubernetes.aio.leaderelection.resourcelock.leaselock import LeaseLock

from otterscale.hub._election import ElectionSettings, election_record
from otterscale.hub._leader import KubernetesLeadership, LeaderInfo
from otterscale.testing import BlackHoleRelay, ControlPlane, set_pod

from .conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.ha]

LEASE = "otterscale-server-leader"
PORT = 8299
TIMINGS = {"lease_duration": 4.0, "renew_deadline": 3.0, "retry_period": 1.0}
#: Candidates that poll every 10 s: a take-over at the next poll is seconds late, a woken one is not.
RARE_POLLS = {"lease_duration": 15.0, "renew_deadline": 13.0, "retry_period": 10.0}
#: "At once" against RARE_POLLS: generous for a loaded box, half a poll period.
AT_ONCE = 5.0


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"ha-{secrets.token_hex(3)}"
    control_plane.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    control_plane.wait_for(
        lambda: control_plane.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        what="the namespace's default ServiceAccount",
    )
    try:
        yield name
    finally:
        control_plane.request("DELETE", f"/api/v1/namespaces/{name}")


def make_pod(cp: ControlPlane, namespace: str, name: str, ip: str | None, **labels: str) -> None:
    set_pod(cp, namespace, name, ip, labels={"app": "hub", **labels})


def set_pod_ip(cp: ControlPlane, namespace: str, name: str, ip: str) -> None:
    set_pod(cp, namespace, name, ip)


def lease(cp: ControlPlane, namespace: str) -> dict[str, Any]:
    found: dict[str, Any] = cp.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{LEASE}"
    )
    return found


def labels(cp: ControlPlane, namespace: str, name: str) -> dict[str, str]:
    pod = cp.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    return dict(pod["metadata"].get("labels") or {})


def relayed_kubeconfig(cp: ControlPlane, relay: BlackHoleRelay, path: Path) -> Path:
    """The admin kubeconfig, through ``relay`` (kube-apiserver's certificate names 127.0.0.1)."""
    document = yaml.safe_load(cp.kubeconfig.read_text())
    for entry in document["clusters"]:
        entry["cluster"]["server"] = f"https://{relay.host}:{relay.port}"
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path


class Candidates:
    """KubernetesLeadership objects started in this test; closed at the end."""

    def __init__(self, cp: ControlPlane, namespace: str, directory: Path) -> None:
        self.cp = cp
        self.namespace = namespace
        self.directory = directory
        self.running: dict[str, KubernetesLeadership] = {}
        self.relays: dict[str, BlackHoleRelay] = {}
        self.changes: dict[str, int] = {}

    async def start(
        self, name: str, *, pod: bool = True, relay: bool = False, timings: dict[str, float] = TIMINGS
    ) -> KubernetesLeadership:
        """Candidate ``name``; with ``relay``, its API server is reached through
        :attr:`relays` ``[name]``."""
        kubeconfig = self.cp.kubeconfig
        if relay:
            self.relays[name] = found = BlackHoleRelay(("127.0.0.1", self.cp.port)).start()
            kubeconfig = relayed_kubeconfig(self.cp, found, self.directory / f"{name}.kubeconfig")
        settings = ElectionSettings(
            namespace=self.namespace,
            identity=name,
            pod_name=name if pod else None,
            kubeconfig=str(kubeconfig),
            **timings,  # type: ignore[arg-type]
        )
        candidate = KubernetesLeadership(settings, port=PORT)
        self.changes[name] = 0

        def changed() -> None:
            self.changes[name] += 1

        await candidate.start(changed)
        self.running[name] = candidate
        return candidate

    def leaders(self) -> list[str]:
        return [name for name, candidate in self.running.items() if candidate.leading]

    async def crash(self, name: str) -> None:
        """Candidate ``name`` (started with ``relay``) loses the API server for good, as after kill
        -9: its connections close and new ones are refused, so it can neither renew, release nor
        unlabel; then its tasks end."""
        self.relays[name].close()
        await self.running.pop(name).close()

    async def close(self) -> None:
        for candidate in self.running.values():
            await candidate.close()
        self.running.clear()
        for relay in self.relays.values():
            relay.close()


@pytest_asyncio.fixture
async def candidates(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> AsyncIterator[Candidates]:
    found = Candidates(control_plane, namespace, tmp_path)
    try:
        yield found
    finally:
        await found.close()


async def until(check: Callable[[], bool], within: float, what: str) -> float:
    """Wait for ``check``; return how long it took."""
    started = time.monotonic()
    await wait_for(check, within, what)
    return time.monotonic() - started


def micro_time(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


async def test_a_missing_lease_is_created_and_renewed_in_utc(candidates: Candidates) -> None:
    cp, ns = candidates.cp, candidates.namespace
    a = await candidates.start("a")
    await until(lambda: a.leading, 10, "a leads")
    first = lease(cp, ns)["spec"]
    assert first["holderIdentity"] == "a"
    assert first["leaseDurationSeconds"] == 4
    renewed = micro_time(first["renewTime"])
    assert abs((datetime.now(UTC) - renewed).total_seconds()) < 3  # real UTC, not local time
    acquired = first["acquireTime"]
    await wait_for(lambda: lease(cp, ns)["spec"]["renewTime"] != first["renewTime"], 10, "a renews")
    again = lease(cp, ns)["spec"]
    assert again["acquireTime"] == acquired
    assert micro_time(again["renewTime"]) > renewed
    # What the Lease watch feeds the candidate reads exactly as the library's own lock reads it
    # (the library's LeaseLock, with a client of its own).
    configuration = client.Configuration()
    await kube_config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        lock = LeaseLock(LEASE, ns, "reader", api)
        for _ in range(10):  # a renewal may fall between the two reads: read again
            before = lease(cp, ns)
            found, record = await lock.get(LEASE, ns)
            assert found
            if lease(cp, ns)["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]:
                assert election_record(before).__dict__ == record.__dict__
                break
        else:
            pytest.fail("the Lease never stood still between two reads")


async def test_exactly_one_leader_while_it_renews(candidates: Candidates) -> None:
    cp, ns = candidates.cp, candidates.namespace
    for name, ip in (("a", "127.0.0.11"), ("b", "127.0.0.12"), ("c", "127.0.0.13")):
        make_pod(cp, ns, name, ip)
    a = await candidates.start("a")
    await until(lambda: a.leading, 10, "a leads")
    b = await candidates.start("b")
    c = await candidates.start("c")
    await wait_for(lambda: b.leader() == LeaderInfo("a", f"127.0.0.11:{PORT}"), 10, "b knows a's address")
    await wait_for(lambda: c.leader() == LeaderInfo("a", f"127.0.0.11:{PORT}"), 10, "c knows a's address")
    renewals = {lease(cp, ns)["spec"]["renewTime"]}
    while len(renewals) < 4:  # several renewals by a: nobody else takes over meanwhile
        assert candidates.leaders() == ["a"]
        assert lease(cp, ns)["spec"]["holderIdentity"] == "a"
        renewals.add(lease(cp, ns)["spec"]["renewTime"])
        await asyncio.sleep(0.1)


async def test_a_release_hands_over_at_once(candidates: Candidates) -> None:
    """The leader releases the Lease: a successor leads at once, woken by its Lease watch, not
    at its next poll (10 s after it started; it started just before the release)."""
    cp, ns = candidates.cp, candidates.namespace
    for name, ip in (("a", "127.0.0.11"), ("b", "127.0.0.12"), ("c", "127.0.0.13")):
        make_pod(cp, ns, name, ip)
    a = await candidates.start("a", timings=RARE_POLLS)
    await until(lambda: a.leading, 10, "a leads")
    b = await candidates.start("b", timings=RARE_POLLS)
    c = await candidates.start("c", timings=RARE_POLLS)
    await wait_for(lambda: b.leader() == LeaderInfo("a", f"127.0.0.11:{PORT}"), 10, "b knows a's address")
    await wait_for(lambda: c.leader() == LeaderInfo("a", f"127.0.0.11:{PORT}"), 10, "c knows a's address")

    await candidates.running.pop("a").close()  # releases the Lease
    released = lease(cp, ns)["spec"]
    assert released.get("holderIdentity") is None
    took = await until(lambda: len(candidates.leaders()) == 1, 30, "a successor leads")
    assert took < AT_ONCE, took
    (successor,) = candidates.leaders()
    spec = lease(cp, ns)["spec"]
    assert spec["holderIdentity"] == successor
    assert spec["leaseTransitions"] == 1
    # As the Lease shows it: acquired right after the release was written.
    assert (micro_time(spec["acquireTime"]) - micro_time(released["renewTime"])).total_seconds() < AT_ONCE
    other = c if successor == "b" else b
    expected_ip = "127.0.0.12" if successor == "b" else "127.0.0.13"
    await wait_for(
        lambda: other.leader() == LeaderInfo(successor, f"{expected_ip}:{PORT}"), 10, "new address"
    )


async def test_an_expired_lease_is_taken_over_on_time(candidates: Candidates) -> None:
    cp, ns = candidates.cp, candidates.namespace
    a = await candidates.start("a", relay=True)
    await until(lambda: a.leading, 10, "a leads")
    b = await candidates.start("b")
    await wait_for(lambda: b.leader() is not None, 10, "b sees a")
    renewals: set[str] = set()

    def renewed_twice() -> bool:  # since b saw a: b's view of the Lease is a renewing one
        renewals.add(lease(cp, ns)["spec"]["renewTime"])
        return len(renewals) >= 3

    await wait_for(renewed_twice, 15, "a few renewals that b has seen")
    await candidates.crash("a")
    last_renew = micro_time(lease(cp, ns)["spec"]["renewTime"])  # the crash left it as it was
    assert lease(cp, ns)["spec"]["holderIdentity"] == "a"
    lag = asyncio.create_task(loop_lag(), name="loop-lag")
    try:
        await wait_for(lambda: b.leading, 30, "b takes over")
    finally:
        lag.cancel()
        worst_lag = await lag
    spec = lease(cp, ns)["spec"]
    assert spec["holderIdentity"] == "b"
    after = (micro_time(spec["acquireTime"]) - last_renew).total_seconds()
    started = time.monotonic()
    lease(cp, ns)
    round_trip = time.monotonic() - started
    # Taken over when the lease ran out as b watched it. If b's Lease watch had to reconnect (seen
    # under CI load: "cannot watch Lease ... TimeoutError") b falls back to polling and may be one
    # retry period late; never the second poll, let alone another lease duration. What load adds
    # on top is measured, not guessed: the event loop's worst lateness while b took over (b's
    # timer and its watch run on it) and two API round trips (the watch delivering a's last
    # renew, b's update).
    allowance = worst_lag + 2 * round_trip
    latest = TIMINGS["lease_duration"] + TIMINGS["retry_period"] + 0.5 + allowance
    assert TIMINGS["lease_duration"] - 0.3 < after < latest, (after, worst_lag, round_trip)


async def loop_lag(period: float = 0.05) -> float:
    """Until cancelled, sleep ``period`` again and again; the worst lateness seen, in seconds."""
    worst = 0.0
    try:
        while True:
            started = time.monotonic()
            await asyncio.sleep(period)
            worst = max(worst, time.monotonic() - started - period)
    except asyncio.CancelledError:
        return worst


async def test_the_leaders_address_follows_its_pod(candidates: Candidates) -> None:
    cp, ns = candidates.cp, candidates.namespace
    make_pod(cp, ns, "a", None)
    a = await candidates.start("a")
    await until(lambda: a.leading, 10, "a leads")
    b = await candidates.start("b", pod=False)
    await wait_for(lambda: b.leader() == LeaderInfo("a", None), 10, "b knows the holder")
    set_pod_ip(cp, ns, "a", "127.0.0.21")
    await wait_for(lambda: b.leader() == LeaderInfo("a", f"127.0.0.21:{PORT}"), 5, "the Pod IP")
    set_pod_ip(cp, ns, "a", "fd00::21")
    await wait_for(lambda: b.leader() == LeaderInfo("a", f"[fd00::21]:{PORT}"), 5, "the new Pod IP")
    assert b.leader() is not None
    assert b.leader().url == f"http://[fd00::21]:{PORT}"  # type: ignore[union-attr]


async def test_the_leader_label_moves_with_the_leadership(candidates: Candidates) -> None:
    cp, ns = candidates.cp, candidates.namespace
    make_pod(cp, ns, "a", "127.0.0.11")
    make_pod(cp, ns, "b", "127.0.0.12", **{"otterscale.io/leader": "true"})  # left by a killed leader
    make_pod(cp, ns, "other", "127.0.0.13", unrelated="yes")
    a = await candidates.start("a")
    await until(lambda: a.leading, 10, "a leads")
    await a.mark_leader()
    assert labels(cp, ns, "a")["otterscale.io/leader"] == "true"
    assert "otterscale.io/leader" not in labels(cp, ns, "b")
    assert labels(cp, ns, "b")["app"] == "hub"  # nothing else touched
    assert labels(cp, ns, "other") == {"app": "hub", "unrelated": "yes"}
    await a.unmark()
    assert "otterscale.io/leader" not in labels(cp, ns, "a")


async def test_a_replica_that_steps_down_lets_another_lead_at_once(candidates: Candidates) -> None:
    cp, ns = candidates.cp, candidates.namespace
    a = await candidates.start("a", timings=RARE_POLLS)
    await until(lambda: a.leading, 10, "a leads")
    b = await candidates.start("b", timings=RARE_POLLS)
    await wait_for(lambda: b.leader() is not None, 10, "b sees a")
    await a.step_down("testing")
    assert not a.leading
    took = await until(lambda: b.leading, 30, "b leads")
    assert took < AT_ONCE, took  # woken by the release, not at its next poll (10 s after it started)
    # a sits out (one lease duration) and then campaigns again as a follower: b keeps the Lease
    # all along, renewing it.
    window = time.monotonic() + RARE_POLLS["lease_duration"] + RARE_POLLS["retry_period"] + 1.5
    while time.monotonic() < window:
        assert candidates.leaders() == ["b"]
        assert lease(cp, ns)["spec"]["holderIdentity"] == "b"
        await asyncio.sleep(0.2)


async def test_a_leader_that_has_not_renewed_in_time_steps_down(
    candidates: Candidates, caplog: pytest.LogCaptureFixture
) -> None:
    """a's API server stops answering (its connections are frozen: no error, no timeout of its
    own): a renewal hangs until the client gives up (5 s), but the watchdog ends the term once the
    last renewal is older than the renew deadline (3 s), and says so. The Lease lasts 10 s here: with
    4 s, its expiry (seen by the same candidate) could end the term first on a loaded box, and the
    watchdog would have nothing left to do."""
    a = await candidates.start("a", relay=True, timings={**TIMINGS, "lease_duration": 10.0})
    await until(lambda: a.leading, 10, "a leads")
    await wait_for(lambda: candidates.changes["a"] > 0, 10, "a's term began")
    changes = candidates.changes["a"]
    caplog.set_level(logging.ERROR, logger="otterscale.hub._election")
    # Every connection, later ones too: a renewal that opens a new connection must hang as well.
    assert candidates.relays["a"].freeze(later=True) > 0
    took = await until(lambda: candidates.changes["a"] > changes, 30, "a stepped down")

    def watchdog_fired() -> bool:
        return any(
            "stepping down" in r.getMessage() and "renew deadline" in r.getMessage() for r in caplog.records
        )

    assert watchdog_fired(), [r.getMessage() for r in caplog.records]
    deadline = TIMINGS["renew_deadline"]
    print(f"\nno renewal for the renew deadline ({deadline:g}s): a stepped down {took:.2f}s after the freeze")
    # The API answers again, nothing else holds the Lease: a campaigns and leads again.
    candidates.relays["a"].thaw()
    await until(lambda: a.leading, 30, "a leads again")
    assert lease(candidates.cp, candidates.namespace)["spec"]["holderIdentity"] == "a"
