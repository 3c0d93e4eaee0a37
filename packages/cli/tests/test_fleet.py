"""``otterscale fleet``'s own logic: arguments to MultiList/MultiWatch requests, and rendering of
items, events and per-cluster outcomes (the calls themselves: tests/e2e/fanout/test_cli.py)."""

from __future__ import annotations

import io
import json

import pytest
from google.protobuf import json_format, struct_pb2

from otterscale.cli import client_options
from otterscale.cli._fleet import (
    _query,
    build_parser,
    list_rows,
    main,
    parse_resource,
    render_event,
    render_status,
    summary,
)
from otterscale.common import UsageError
from otterscale.resource.v1 import multicluster_pb2 as pb
from otterscale.resource.v1 import resource_pb2

ENV = {"OTTERSCALE_HUB": "http://127.0.0.1:1", "OTTERSCALE_TOKEN": "t0k", "OTTERSCALE_CLUSTER": "prod"}
Outcome = pb.ClusterStatus.Outcome


def test_resources() -> None:
    assert parse_resource("configmaps") == ("", "v1", "configmaps")
    assert parse_resource("deploy") == ("apps", "v1", "deployments")
    assert parse_resource("widgets.v1.example.com") == ("example.com", "v1", "widgets")
    for bad in ("", "widgets.v1", "a/b", ".v1.x"):
        with pytest.raises(UsageError):
            parse_resource(bad)


def test_list_arguments_make_the_request() -> None:
    args = build_parser().parse_args(
        [
            "list",
            "pods",
            "--cluster",
            "east",
            "--cluster",
            "west",
            "--cluster-selector",
            "env=prod",
            "-n",
            "shop",
            "-l",
            "app=web",
            "--field-selector",
            "status.phase=Running",
            "--per-cluster-timeout",
            "2.5",
            "--max-concurrency",
            "4",
            "--require-all",
            "--limit",
            "7",
        ]
    )
    fleet = _query(args)
    assert list(fleet.selection.clusters) == ["east", "west"]
    assert fleet.selection.label_selector == "env=prod"
    assert (fleet.query.group, fleet.query.version, fleet.query.resource) == ("", "v1", "pods")
    assert (fleet.query.namespace, fleet.query.label_selector, fleet.query.field_selector) == (
        "shop",
        "app=web",
        "status.phase=Running",
    )
    assert fleet.options.per_cluster_timeout.ToMilliseconds() == 2500
    assert (fleet.options.max_concurrency, fleet.options.require_all) == (4, True)
    assert (args.limit, args.order, args.output) == (7, "fair", "table")
    # The selection is the fleet command's own: OTTERSCALE_CLUSTER is not read, none is needed.
    assert client_options(args, ENV).cluster == ""
    assert client_options(args, {k: v for k, v in ENV.items() if k != "OTTERSCALE_CLUSTER"}).cluster == ""


def test_watch_arguments() -> None:
    args = build_parser().parse_args(
        [
            "watch",
            "widgets.v1.example.com",
            "--resume",
            "mwr1.x",
            "--initial-events",
            "none",
            "--checkpoint-interval",
            "1",
        ]
    )
    fleet = _query(args)
    assert list(fleet.selection.clusters) == []  # with no selector either: every cluster
    assert fleet.selection.label_selector == ""
    assert (fleet.query.group, fleet.query.namespace) == ("example.com", "")
    assert (args.resume, args.initial_events, args.checkpoint_interval, args.no_resync) == (
        "mwr1.x",
        "none",
        1.0,
        False,
    )
    assert fleet.options.require_all is False


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "pods", "--limit", "-1"],
        ["list", "pods", "--per-cluster-timeout", "0"],
        ["list", "pods", "--order", "random"],
        ["watch", "pods", "--initial-events", "some"],
        ["watch", "pods", "--require-all"],
        ["pods"],
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2


def test_bad_resource_exits_2_before_any_call(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    assert main(["list", "widgets.v1"]) == 2
    assert "otterscale fleet: error: 'widgets.v1': expected PLURAL" in capsys.readouterr().err


def _resource(namespace: str, name: str) -> resource_pb2.Resource:
    obj = struct_pb2.Struct()
    json_format.ParseDict({"kind": "ConfigMap", "metadata": {"namespace": namespace, "name": name}}, obj)
    return resource_pb2.Resource(object=obj)


def test_rendering() -> None:
    page = pb.MultiListResponse(
        lists=[
            pb.ClusterList(
                cluster="east",
                list=resource_pb2.ListResponse(items=[_resource("a", "x"), _resource("a", "y")]),
            ),
            pb.ClusterList(cluster="west", list=resource_pb2.ListResponse(items=[_resource("b", "z")])),
        ]
    )
    rows = list_rows(page)
    assert [(c, o["metadata"]["name"]) for c, o in rows] == [("east", "x"), ("east", "y"), ("west", "z")]

    statuses = [
        pb.ClusterStatus(cluster="west", outcome=Outcome.OUTCOME_UNAVAILABLE, message="agent not connected"),
        pb.ClusterStatus(cluster="east", outcome=Outcome.OUTCOME_OK),
        pb.ClusterStatus(cluster="west", outcome=Outcome.OUTCOME_OK),  # a later page: it came back
        pb.ClusterStatus(
            cluster="north", outcome=Outcome.OUTCOME_FORBIDDEN, code="permission_denied", message="forbidden"
        ),
    ]
    assert summary(statuses, {"east": 2, "west": 1}) == [
        "CLUSTER  OUTCOME                        ITEMS  MESSAGE",
        "east     ok                             2",
        "north    forbidden (permission_denied)  0      forbidden",
        "west     ok                             1",
    ]
    assert render_status(statuses[0]) == "west: unavailable: agent not connected"
    assert (
        render_status(pb.ClusterStatus(cluster="e", outcome=Outcome.OUTCOME_RESYNC_START))
        == "e: resync_start"
    )

    event = pb.ClusterEvent(
        cluster="east",
        event=resource_pb2.WatchEvent(
            type=resource_pb2.WatchEvent.TYPE_MODIFIED, resource=_resource("a", "x"), resource_version="42"
        ),
    )
    assert render_event(event, "table") == "east  MODIFIED  a/x  42"
    assert json.loads(render_event(event, "json")) == {
        "cluster": "east",
        "type": "MODIFIED",
        "object": {"kind": "ConfigMap", "metadata": {"namespace": "a", "name": "x"}},
        "resourceVersion": "42",
    }


def test_help_explains_every_option() -> None:
    for action in ("list", "watch"):
        text = io.StringIO()
        parser = build_parser()
        sub = parser._subparsers._group_actions[0].choices[action]  # type: ignore[union-attr]
        sub.print_help(text)
        for option in sub._actions:
            if option.option_strings:
                assert option.help, f"{action} {option.option_strings} has no help"
        assert "exit status" in text.getvalue()
