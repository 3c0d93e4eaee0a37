"""The audit log: JSON lines to stdout or a rotated file, apart from the services' logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from otterscale.common import (
    AuditClusterOutcome,
    AuditConfig,
    AuditEvent,
    AuditLog,
    AuditSession,
    AuditTarget,
)


def event(**changes: object) -> AuditEvent:
    values: dict[str, object] = {
        "time": 1_700_000_000.25,
        "component": "hub",
        "replica": "hub-0",
        "request_id": "req-1",
        "subject": "alice",
        "groups": ("oidc:team-a",),
        "service": "otterscale.resource.v1.ResourceService",
        "verb": "Create",
        "target": AuditTarget(
            cluster="east", version="v1", resource="configmaps", namespace="team-a", name="settings"
        ),
        "code": "ok",
        "duration_ms": 12.5,
        "source": "10.0.0.7:51234",
    }
    values.update(changes)
    return AuditEvent(**values)  # type: ignore[arg-type]


def test_an_event_is_one_json_object_with_every_field() -> None:
    line = event().to_json()
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.250Z",
        "component": "hub",
        "replica": "hub-0",
        "request_id": "req-1",
        "subject": "alice",
        "groups": ["oidc:team-a"],
        "cluster": "east",
        "service": "otterscale.resource.v1.ResourceService",
        "verb": "Create",
        "group": "",
        "version": "v1",
        "resource": "configmaps",
        "namespace": "team-a",
        "name": "settings",
        "dry_run": False,
        "code": "ok",
        "duration_ms": 12.5,
        "source": "10.0.0.7:51234",
        "forwarded_by": "",
    }


def test_a_session_event_inlines_the_session() -> None:
    session = AuditSession(
        session="3f2a9c1d0b7e",
        phase="end",
        kind="exec",
        container="app",
        argv=("sh", "-c", "id"),
        tty=True,
        bytes_in=12,
        bytes_out=340,
        exit_code=0,
    )
    document = json.loads(event(component="agent", verb="ExecuteTTY", session=session).to_json())
    assert document["component"] == "agent"
    assert {key: document[key] for key in ("session", "phase", "kind", "container", "argv", "tty")} == {
        "session": "3f2a9c1d0b7e",
        "phase": "end",
        "kind": "exec",
        "container": "app",
        "argv": ["sh", "-c", "id"],
        "tty": True,
    }
    assert (document["port"], document["bytes_in"], document["bytes_out"], document["exit_code"]) == (
        0,
        12,
        340,
        0,
    )
    assert "session" not in json.loads(event().to_json())  # a call's event has no session part


def test_a_multi_cluster_event_adds_each_clusters_outcome() -> None:
    clusters = {
        "east": AuditClusterOutcome("ok", items=120, duration_ms=41.0),
        "west": AuditClusterOutcome("unavailable", reconnects=2),
    }
    document = json.loads(event(target=AuditTarget(resource="configmaps"), clusters=clusters).to_json())
    assert document["cluster"] == ""
    assert document["clusters"] == {
        "east": {"outcome": "ok", "items": 120, "duration_ms": 41.0, "reconnects": 0},
        "west": {"outcome": "unavailable", "items": 0, "duration_ms": 0.0, "reconnects": 2},
    }


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_stdout_sink_writes_lines_and_stays_out_of_the_logs(capsys: pytest.CaptureFixture[str]) -> None:
    caught = _Records()
    root = logging.getLogger()
    root.addHandler(caught)
    try:
        log = AuditLog.from_config(AuditConfig())
        log.write(event())
        log.write(event(verb="Delete", code="permission_denied"))
        log.close()
        log.write(event(verb="Apply"))  # after close: dropped, not an error
    finally:
        root.removeHandler(caught)
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["verb"] for line in lines] == ["Create", "Delete"]
    assert json.loads(lines[1])["code"] == "permission_denied"
    assert not caught.records  # audit lines are not log records: no log handler sees them


def test_reads_are_audited_only_at_metadata() -> None:
    assert AuditLog.from_config(AuditConfig()).wants("write")
    assert not AuditLog.from_config(AuditConfig()).wants("read")
    assert AuditLog.from_config(AuditConfig(reads="metadata")).wants("read")


def test_file_sink_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog.from_config(AuditConfig(sink="file", file=path, max_bytes=64 * 1024, backups=2))
    for index in range(600):  # about 240 KB: more than three files' worth
        log.write(event(request_id=f"req-{index}"))
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.log", "audit.log.1", "audit.log.2"]
    for file in files:
        assert file.stat().st_size <= 64 * 1024
        for line in file.read_text().splitlines():
            assert json.loads(line)["component"] == "hub"
    newest = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
    assert newest[-1] == "req-599"


def test_an_unwritable_file_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        AuditLog.from_config(AuditConfig(sink="file", file=tmp_path / "missing-dir" / "audit.log"))
