"""The CLI's own logic: arguments, environment, workload names, ports, durations, log prefixes,
and the ordered writer (offsets, batching, close)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from otterscale.cli import client_options, parse_workload
from otterscale.cli._exec import build_parser as exec_parser
from otterscale.cli._input import OrderedWriter
from otterscale.cli._logs import _Prefixer, parse_duration, request_from
from otterscale.cli._logs import build_parser as logs_parser
from otterscale.cli._options import run_command
from otterscale.cli._portforward import PortMapping, parse_ports
from otterscale.common import UsageError


def test_workloads() -> None:
    web = parse_workload("deploy/web")
    assert (web.group, web.version, web.resource, web.name) == ("apps", "v1", "deployments", "web")
    assert str(web) == "deployment.apps/web"
    assert parse_workload("sts/db").resource == "statefulsets"
    assert parse_workload("rc/old").group == ""
    custom = parse_workload("widgets.v1.example.com/w")
    assert (custom.group, custom.version, custom.resource) == ("example.com", "v1", "widgets")
    for bad in ("web", "deployment/", "/web", "widgets/w", "widgets.v1/w"):
        with pytest.raises(UsageError):
            parse_workload(bad)


def test_ports() -> None:
    assert parse_ports(["8080", "9000:80", ":443"]) == [
        PortMapping(8080, 8080),
        PortMapping(9000, 80),
        PortMapping(0, 443),
    ]
    for bad in (["x"], ["80:0"], ["70000"], []):
        with pytest.raises(UsageError):
            parse_ports(bad)


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m5s") == 5405
    for bad in ("", "5x", "m"):
        with pytest.raises(UsageError):
            parse_duration(bad)


ENV = {"OTTERSCALE_HUB": "http://127.0.0.1:1", "OTTERSCALE_CLUSTER": "prod", "OTTERSCALE_TOKEN": "t0k"}


def test_environment_fills_what_flags_leave_out(tmp_path: Path) -> None:
    args = logs_parser().parse_args(["web-0"])
    options = client_options(args, ENV)
    assert (options.hub, options.cluster, options.namespace, options.bearer()) == (
        "http://127.0.0.1:1",
        "prod",
        "default",
        "t0k",
    )
    assert "t0k" not in repr(options)
    token = tmp_path / "token"
    token.write_text("from-file\n")
    args = logs_parser().parse_args(["web-0", "--cluster", "dev", "-n", "shop", "--token-file", str(token)])
    options = client_options(args, ENV)
    assert (options.cluster, options.namespace, options.bearer()) == ("dev", "shop", "from-file")
    token.write_text("refreshed")
    assert options.bearer() == "refreshed"  # read again for every call


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({}, "no hub"),
        ({"OTTERSCALE_HUB": "ftp://x"}, r"http\(s\) URL"),
        ({"OTTERSCALE_HUB": "http://h"}, "no cluster"),
        ({"OTTERSCALE_HUB": "http://h", "OTTERSCALE_CLUSTER": "c"}, "no token"),
    ],
)
def test_missing_settings_are_usage_errors(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        client_options(logs_parser().parse_args(["web-0"]), environ)


def test_usage_errors_exit_2_without_calling(capsys: pytest.CaptureFixture[str]) -> None:
    async def body(*_: object) -> int:
        raise AssertionError("must not run")

    assert run_command("logs", logs_parser(), ["web-0"], body, environ={}) == 2
    assert "otterscale logs: error: no hub" in capsys.readouterr().err


def test_exec_command_after_dashes(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[object] = []

    async def body(args: object, options: object) -> int:
        seen.append(args)
        return 7

    argv = ["web-0", "-it", "--", "sh", "-c", "echo -n hi"]
    assert run_command("exec", exec_parser(), argv, body, environ=ENV, command_after_dashes=True) == 7
    args = seen[0]
    assert args.command == ["sh", "-c", "echo -n hi"]  # type: ignore[attr-defined]
    assert args.stdin  # type: ignore[attr-defined]
    assert args.tty  # type: ignore[attr-defined]


def test_log_request_options() -> None:
    args = logs_parser().parse_args(["web-0", "--tail", "0", "--since", "5m", "--limit-bytes", "10", "-f"])
    request = request_from(args, client_options(args, ENV))
    assert request.HasField("tail_lines")
    assert request.tail_lines == 0
    assert (request.since_seconds, request.limit_bytes, request.follow) == (300, 10, True)
    plain = logs_parser().parse_args(["web-0"])
    request = request_from(plain, client_options(plain, ENV))
    assert not request.HasField("tail_lines")


def test_prefixes_start_every_line_even_across_chunks() -> None:
    out = io.BytesIO()
    prefixer = _Prefixer("web-0", out)
    prefixer.write("app", b"one\ntw")
    prefixer.write("side", b"x\n")
    prefixer.write("app", b"o\n")
    assert out.getvalue() == b"[pod/web-0/app] one\n[pod/web-0/app] tw[pod/web-0/side] x\no\n"


async def test_ordered_writer_batches_with_offsets_and_closes() -> None:
    sent: list[tuple[bytes, int, bool]] = []
    gate = asyncio.Event()

    async def send(data: bytes, offset: int, close: bool) -> None:
        sent.append((data, offset, close))
        await gate.wait()

    writer = OrderedWriter(send, max_write=4)
    task = asyncio.ensure_future(writer.run())
    writer.feed(b"ab")
    await asyncio.sleep(0)
    writer.feed(b"cdefgh")  # arrives while "ab" is in flight: goes out in 4-byte writes
    writer.close()
    gate.set()
    await asyncio.wait_for(task, 5.0)
    assert sent == [(b"ab", 0, False), (b"cdef", 2, False), (b"gh", 6, True)]


async def test_ordered_writer_close_after_everything_was_sent() -> None:
    sent: list[tuple[bytes, int, bool]] = []

    async def send(data: bytes, offset: int, close: bool) -> None:
        sent.append((data, offset, close))

    writer = OrderedWriter(send)
    task = asyncio.ensure_future(writer.run())
    writer.feed(b"abc")
    await asyncio.sleep(0.01)
    writer.close()
    await asyncio.wait_for(task, 5.0)
    assert sent == [(b"abc", 0, False), (b"", 3, True)]
    cannot = OrderedWriter(send, can_close=False)
    cannot.close()
    await asyncio.wait_for(cannot.run(), 5.0)
    assert len(sent) == 2
