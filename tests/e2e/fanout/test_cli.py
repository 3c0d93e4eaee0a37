"""``otterscale fleet list | watch``: the real CLI process against the fan-out fleet.

The installed ``otterscale`` command talks to the real hub, which fans out over real agents,
chisel tunnels and kube-apiservers (see conftest.py); alice's token comes from the LocalIssuer
through ``OTTERSCALE_TOKEN``. What the CLI prints is checked against each cluster's own List.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import pytest

from otterscale.testing import otterscale_command

from .conftest import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

NAMESPACE = "team-c"
#: The query of every call here: ConfigMaps of one namespace.
QUERY = ("configmaps", "-n", NAMESPACE)
#: Two clusters alice may list that namespace in (different control planes).
BOTH = ("--cluster", "a-full", "--cluster", "f-nocrd")
#: Seconds a CLI run or an expected line may take (generous: a loaded 2-core box, 4 control planes).
WAIT = 120.0


def _env(fleet: Fleet) -> dict[str, str]:
    return {
        **os.environ,
        "OTTERSCALE_HUB": fleet.system.hub_url,
        "OTTERSCALE_TOKEN": fleet.token("alice"),
        "OTTERSCALE_CLUSTER": "ignored-by-fleet",
    }


def _fleet(fleet: Fleet, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*otterscale_command(), "fleet", *argv],
        capture_output=True,
        text=True,
        env=_env(fleet),
        timeout=WAIT,
        check=False,
    )


def _summary(stderr: str) -> dict[str, tuple[str, int]]:
    """cluster -> (outcome, items) from the CLI's outcome table on stderr."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CLUSTER "))
    found = {}
    for line in lines[start + 1 :]:
        if line.startswith(("resume: ", "otterscale ")):
            break
        cluster, outcome, *rest = line.split()
        if rest[0].startswith("("):  # "c-none  forbidden (permission_denied)  0  pods is forbidden..."
            rest = rest[1:]
        found[cluster] = (outcome, int(rest[0]))
    return found


def test_fleet_list_two_clusters_pages_and_outcomes(fleet: Fleet) -> None:
    """Items of both clusters exactly once through many small pages; the forbidden and the
    unknown cluster each get their outcome; exit status 3 because some cluster was not OK."""
    truth = {
        (cluster, namespace, name)
        for cluster in ("a-full", "f-nocrd")
        for namespace, name in fleet.truth(cluster, namespace=NAMESPACE)
    }
    assert len(truth) >= 2 * 40  # the conftest's ConfigMaps: many pages of 7
    done = _fleet(
        fleet,
        "list",
        *QUERY,
        *BOTH,
        "--cluster",
        "c-none",
        "--cluster",
        "no-such-cluster",
        "--limit",
        "7",
        "-o",
        "json",
    )
    assert done.returncode == 3, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    listed = [
        (r["cluster"], r["object"]["metadata"]["namespace"], r["object"]["metadata"]["name"]) for r in rows
    ]
    assert len(listed) == len(set(listed)), "an object listed twice"
    assert set(listed) == truth
    summary = _summary(done.stderr)
    assert summary["a-full"] == ("ok", len([t for t in truth if t[0] == "a-full"]))
    assert summary["f-nocrd"] == ("ok", len([t for t in truth if t[0] == "f-nocrd"]))
    assert summary["c-none"][0] == "forbidden"
    assert summary["no-such-cluster"] == ("unknown_cluster", 0)
    assert fleet.token("alice").split(".")[2] not in done.stdout + done.stderr

    # The default table, and all-or-nothing: the same selection fails as a call (exit 1).
    done = _fleet(fleet, "list", *QUERY, *BOTH)
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[0].split() == ["CLUSTER", "NAMESPACE", "NAME"]
    assert {tuple(line.split()) for line in table[1:]} == truth
    assert "resume: " in done.stderr
    done = _fleet(fleet, "list", *QUERY, "--cluster", "a-full", "--cluster", "c-none", "--require-all")
    assert done.returncode == 1
    assert "failed_precondition" in done.stderr
    assert _summary(done.stderr)["c-none"][0] == "forbidden"


class _Lines:
    """A pipe's lines, read by a thread (the watch process writes while the test waits)."""

    def __init__(self, pipe: IO[str] | None) -> None:
        assert pipe is not None
        self.seen: list[str] = []
        self._pipe = pipe
        self._queue: queue.Queue[str | None] = queue.Queue()  # None: the pipe ended
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True, name="cli-pipe-reader")
        self._thread.start()

    def close(self) -> None:
        """After the process ended: the reader is at the pipe's end; join it, close the pipe."""
        self._thread.join(timeout=WAIT)
        self._pipe.close()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            for line in self.seen:
                if predicate(line):
                    return line
            try:
                got = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} within {WAIT:g}s; seen: {self.seen[-20:]}") from None
            if got is None:  # the process ended: what was not written will not come
                self._queue.put(None)
                raise AssertionError(f"no {what} before the output ended; seen: {self.seen[-20:]}")
            self.seen.append(got)


@dataclass
class Watch:
    process: subprocess.Popen[str]
    out: _Lines
    err: _Lines


@pytest.fixture
def watch(fleet: Fleet) -> Iterator[Watch]:
    process = subprocess.Popen(
        [
            *otterscale_command(),
            "fleet",
            "watch",
            *QUERY,
            *BOTH,
            "--initial-events",
            "none",
            "--checkpoint-interval",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(fleet),
    )
    found = Watch(process, _Lines(process.stdout), _Lines(process.stderr))
    try:
        yield found
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=WAIT)
        found.out.close()
        found.err.close()


def test_fleet_watch_tags_events_and_prints_the_resume_token(fleet: Fleet, watch: Watch) -> None:
    """An event written in one cluster appears tagged with it; every leg's state is on stderr;
    SIGINT stops the watch with status 0 and the last checkpoint's resume token."""
    out, err = watch.out, watch.err
    for cluster in ("a-full", "f-nocrd"):
        err.wait_for(
            lambda line, c=cluster: line == f"otterscale fleet watch: {c}: synced", f"{cluster} synced"
        )
    name = f"cli-{uuid.uuid4().hex[:8]}"
    plane = fleet.plane("f-nocrd")
    path = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
    plane.request(
        "POST",
        path,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NAMESPACE}},
    )
    try:
        line = out.wait_for(lambda line: f"{NAMESPACE}/{name}" in line, "the new ConfigMap's event")
    finally:
        # The fleet is shared by the module's tests, which count the team namespaces' items.
        plane.request("DELETE", f"{path}/{name}")
    assert line.split()[:3] == ["f-nocrd", "ADDED", f"{NAMESPACE}/{name}"]
    watch.process.send_signal(signal.SIGINT)
    assert watch.process.wait(timeout=WAIT) == 0, err.seen
    resume = err.wait_for(lambda line: line.startswith("resume: "), "the resume token")
    assert len(resume.split()) == 2
    assert resume.split()[1]
