"""The chisel helpers: version checks, authfile, log parsing, and real server/client processes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from otterscale.common import (
    MIN_CHISEL_VERSION,
    ChiselBinary,
    ChiselClient,
    ChiselServer,
    ChiselServerEvent,
    ClientEventKind,
    ServerEventKind,
    TunnelError,
    TunnelUser,
    authfile_content,
    check_chisel,
    find_chisel,
    parse_chisel_version,
    parse_client_line,
    parse_server_line,
    reverse_remote_pattern,
    write_authfile,
)
from otterscale.testing import free_port, tool_path

FINGERPRINT = "E97EOY8Bg2V4DOgufS82hYdQzy9WGXbhgFySDXeLXC0="


# --------------------------------------------------------------------------------------------------
# Binary


def fake_chisel(tmp_path: Path, output: str) -> Path:
    path = tmp_path / "chisel"
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("text", "version"), [("1.12.0", (1, 12, 0)), ("v1.11.5\n", (1, 11, 5)), ("dev", None)]
)
def test_parse_version(text: str, version: tuple[int, int, int] | None) -> None:
    assert parse_chisel_version(text) == version


def test_check_accepts_new_enough(tmp_path: Path) -> None:
    for text in ("1.11.5", "1.12.0", "2.0.0"):
        binary = check_chisel(fake_chisel(tmp_path, text))
        assert binary.version >= MIN_CHISEL_VERSION


@pytest.mark.parametrize(
    ("text", "message"), [("1.11.4", "older than the required 1.11.5"), ("0.0.0-src", "cannot tell")]
)
def test_check_refuses_old_or_unknown(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TunnelError, match=message):
        check_chisel(fake_chisel(tmp_path, text))


def test_find(tmp_path: Path) -> None:
    with pytest.raises(TunnelError, match="does not exist"):
        find_chisel(tmp_path / "nope")
    not_executable = tmp_path / "plain"
    not_executable.write_text("")
    with pytest.raises(TunnelError, match="not executable"):
        find_chisel(not_executable)
    with pytest.raises(TunnelError, match=r"not found on PATH.*--chisel"):
        find_chisel(search_path=str(tmp_path / "empty"))
    fake = fake_chisel(tmp_path, "1.12.0")
    assert find_chisel(search_path=str(tmp_path)) == fake


def test_real_binary() -> None:
    binary = check_chisel(tool_path("chisel"))
    assert binary.version >= (1, 12, 0)
    assert binary.version_text.startswith("1.")


# --------------------------------------------------------------------------------------------------
# Authfile


def test_authfile_patterns_are_anchored_and_escaped() -> None:
    assert reverse_remote_pattern(51001) == r"^R:127\.0\.0\.1:51001$"
    content = json.loads(authfile_content([TunnelUser("a", "pa", 51001), TunnelUser("b", "p:b", 51002)]))
    assert content == {"a:pa": [r"^R:127\.0\.0\.1:51001$"], "b:p:b": [r"^R:127\.0\.0\.1:51002$"]}


@pytest.mark.parametrize(
    ("users", "message"),
    [
        ([], "no tunnel users"),
        ([TunnelUser("a", "x", 1), TunnelUser("b", "y", 1)], "share port"),
        ([TunnelUser("a", "x", 1), TunnelUser("a", "y", 2)], "listed twice"),
    ],
)
def test_authfile_refuses_ambiguity(users: list[TunnelUser], message: str) -> None:
    with pytest.raises(TunnelError, match=message):
        authfile_content(users)


@pytest.mark.parametrize(
    ("user", "password", "port"), [("", "p", 1), ("a:b", "p", 1), ("a", "", 1), ("a", "p", 0)]
)
def test_tunnel_user_validation(user: str, password: str, port: int) -> None:
    with pytest.raises(TunnelError):
        TunnelUser(user, password, port)


def test_write_authfile_is_0600_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text("old")
    path.chmod(0o644)
    write_authfile(path, [TunnelUser("a", "secret", 51001)])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"a:secret": [r"^R:127\.0\.0\.1:51001$"]}
    assert [p.name for p in tmp_path.iterdir()] == ["users.json"]


# --------------------------------------------------------------------------------------------------
# Log lines (chisel 1.12.0, as recorded)


TS = "2026/11/27 19:53:36 "
SERVER_LINES = [
    (
        TS + f"server: Fingerprint {FINGERPRINT}",
        ChiselServerEvent(ServerEventKind.FINGERPRINT, detail=FINGERPRINT),
    ),
    (
        TS + "server: Listening on http://127.0.0.1:18300",
        ChiselServerEvent(ServerEventKind.LISTENING, address="http://127.0.0.1:18300"),
    ),
    (
        TS + "server: session#2: Open (user=a addr=127.0.0.1:49576 remotes=R:127.0.0.1:51001:127.0.0.1:9999)",
        ChiselServerEvent(
            ServerEventKind.SESSION_OPEN, session=2, user="a", address="127.0.0.1:49576", ports=(51001,)
        ),
    ),
    (
        TS + "server: session#2: tun: proxy#R:127.0.0.1:51001=>9999: Listening",
        ChiselServerEvent(ServerEventKind.TUNNEL_OPEN, session=2, ports=(51001,)),
    ),
    (
        TS + "server: session#2: Close (user=a addr=127.0.0.1:49576 duration=3.001270232s)",
        ChiselServerEvent(
            ServerEventKind.SESSION_CLOSED,
            session=2,
            user="a",
            address="127.0.0.1:49576",
            detail="3.001270232s",
        ),
    ),
    (
        TS + "server: session#1: Close (user=alpha addr=127.0.0.1:58946 duration=3.923043ms) "
        "(error read tcp 127.0.0.1:59951->127.0.0.1:58946: use of closed network connection)",
        ChiselServerEvent(
            ServerEventKind.SESSION_CLOSED,
            session=1,
            user="alpha",
            address="127.0.0.1:58946",
            detail="3.923043ms; error read tcp 127.0.0.1:59951->127.0.0.1:58946: "
            "use of closed network connection",
        ),
    ),
    (
        TS + 'server: Login failed for user "a" (127.0.0.1:55000)',
        ChiselServerEvent(ServerEventKind.LOGIN_FAILED, user="a", address="127.0.0.1:55000"),
    ),
    (
        TS + "server: session#3: Failed: server: access to 'R:127.0.0.1:51002' denied",
        ChiselServerEvent(
            ServerEventKind.SESSION_FAILED,
            session=3,
            ports=(51002,),
            detail="server: access to 'R:127.0.0.1:51002' denied",
        ),
    ),
    (
        TS + "server: session#4: Failed: server: Server cannot listen on R:127.0.0.1:51001=>9999",
        ChiselServerEvent(
            ServerEventKind.SESSION_FAILED,
            session=4,
            ports=(51001,),
            detail="server: Server cannot listen on R:127.0.0.1:51001=>9999",
        ),
    ),
    (
        TS + "server: session#4: Failed: server: access to '127.0.0.1:22' denied",
        ChiselServerEvent(
            ServerEventKind.SESSION_FAILED, session=4, detail="server: access to '127.0.0.1:22' denied"
        ),
    ),
]


@pytest.mark.parametrize(("line", "event"), SERVER_LINES)
def test_parse_server_line(line: str, event: ChiselServerEvent) -> None:
    assert parse_server_line(line) == event


def test_other_server_lines_are_ignored() -> None:
    for other in ("2026/11/27 19:53:35.811 GET / 200 1ms", "server: session#2: tun: SSH connected", ""):
        assert parse_server_line(other) is None


def test_parse_client_lines() -> None:
    cases = {
        "2026/11/27 19:53:36 client: Connecting to ws://127.0.0.1:18300": (ClientEventKind.CONNECTING, None),
        f"2026/11/27 19:53:36 client: Fingerprint {FINGERPRINT}": (ClientEventKind.FINGERPRINT, FINGERPRINT),
        "2026/11/27 19:53:36 client: Connected (Latency 527.234µs)": (ClientEventKind.CONNECTED, "527.234µs"),
        "2026/11/27 19:53:39 client: Disconnected": (ClientEventKind.DISCONNECTED, None),
        "2026/11/27 19:53:38 client: Connection error: server: access to 'R:127.0.0.1:51002' denied "
        "(Attempt: 1/unlimited)": (ClientEventKind.ERROR, "server: access to 'R:127.0.0.1:51002' denied"),
        "2026/11/27 19:53:38 client: Retrying in 2s...": (ClientEventKind.RETRYING, "2s"),
    }
    for line, (kind, detail) in cases.items():
        event = parse_client_line(line)
        assert event is not None, line
        assert (event.kind, event.detail) == (kind, detail), line
    assert parse_client_line("client: tun: SSH connected") is None


# --------------------------------------------------------------------------------------------------
# Arguments and environment (no process)


def test_server_spec_keeps_secrets_out_of_argv(tmp_path: Path) -> None:
    users = [TunnelUser("a", "password-a", 51001)]
    server = ChiselServer("/bin/chisel", host="127.0.0.2", port=8300, users=users, key_seed="seed-secret")
    spec = server.process_spec(tmp_path / "users.json")
    assert spec.env == {"CHISEL_KEY": "seed-secret"}
    argv = " ".join(spec.argv)
    assert "seed-secret" not in argv
    assert "password-a" not in argv
    assert "--reverse" in spec.argv
    assert "--socks5" not in spec.argv
    keyed = ChiselServer(
        "/bin/chisel", host="127.0.0.2", port=8300, users=users, key_file=tmp_path / "key.pem"
    )
    spec = keyed.process_spec(tmp_path / "users.json")
    assert spec.env == {}
    assert spec.argv[spec.argv.index("--keyfile") + 1] == str(tmp_path / "key.pem")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key_seed": None}, "exactly one of key_seed or key_file"),
        ({"key_file": "k.pem"}, "exactly one of key_seed or key_file"),
        ({"users": []}, "no tunnel users"),
    ],
)
def test_server_settings_are_checked(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "host": "127.0.0.2",
        "port": 8300,
        "users": [TunnelUser("a", "p", 1)],
        "key_seed": "s",
    }
    values.update(kwargs)
    with pytest.raises(TunnelError, match=message):
        ChiselServer("/bin/chisel", **values)  # type: ignore[arg-type]


def client_args(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "server_url": "https://hub.example:8300",
        "fingerprint": FINGERPRINT,
        "user": "dev-agent",
        "password": "dev-password",
        "tunnel_port": 51001,
        "api_port": 8299,
    }
    values.update(overrides)
    return values


def test_client_spec() -> None:
    client = ChiselClient("/bin/chisel", **client_args())  # type: ignore[arg-type]
    spec = client.process_spec()
    assert spec.env == {"AUTH": "dev-agent:dev-password"}
    assert "dev-password" not in " ".join(spec.argv)
    assert spec.argv[spec.argv.index("--fingerprint") + 1] == FINGERPRINT
    assert spec.argv[spec.argv.index("--max-retry-interval") + 1] == "3s"
    assert spec.argv[-2:] == ("https://hub.example:8300", "R:127.0.0.1:51001:127.0.0.1:8299")
    assert not client.connected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fingerprint": None}, "fingerprint is required.*--print-fingerprint"),
        ({"fingerprint": ""}, "fingerprint is required"),
        ({"fingerprint": "70:be:18:2e"}, "base64 SHA256"),
        ({"max_retry_interval": 0.5}, "at least 1 second"),
        ({"server_url": "hub:8300"}, "must be http"),
        ({"server_url": "http://u:p@hub:8300"}, "not in the URL"),
        ({"password": ""}, "empty password"),
        ({"api_port": 0}, "out of range"),
    ],
)
def test_client_settings_are_checked(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(TunnelError, match=message):
        ChiselClient("/bin/chisel", **client_args(**overrides))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Real processes


@pytest.fixture(scope="module")
def binary() -> ChiselBinary:
    return check_chisel(tool_path("chisel"))


@pytest_asyncio.fixture
async def server(binary: ChiselBinary) -> AsyncIterator[tuple[ChiselServer, list[ChiselServerEvent]]]:
    events: list[ChiselServerEvent] = []
    found = ChiselServer(
        binary,
        host="127.0.0.1",
        port=free_port(),
        users=[TunnelUser("alpha", "alpha-pass", free_port()), TunnelUser("beta", "beta-pass", free_port())],
        key_seed="common-test-seed",
        on_event=events.append,
        backoff_initial=0.1,
    )
    await found.start()
    try:
        yield found, events
    finally:
        await found.stop()


async def echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def wait_until(check: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.integration
async def test_server_and_client_connect(
    server: tuple[ChiselServer, list[ChiselServerEvent]], binary: ChiselBinary
) -> None:
    chisel, events = server
    assert chisel.fingerprint is not None
    assert chisel.url is not None
    assert chisel.authfile is not None
    assert stat.S_IMODE(chisel.authfile.stat().st_mode) == 0o600
    alpha_port = json.loads(chisel.authfile.read_text())["alpha:alpha-pass"][0].split(":")[-1].rstrip("$")
    echo, api_port = await echo_server()
    states = []
    client = ChiselClient(
        binary,
        server_url=chisel.url,
        fingerprint=chisel.fingerprint,
        user="alpha",
        password="alpha-pass",
        tunnel_port=int(alpha_port),
        api_port=api_port,
        max_retry_interval=1,
        on_state=states.append,
    )
    await client.start()
    try:
        assert await client.wait_connected(10)
        assert client.state.server_fingerprint == chisel.fingerprint
        await wait_until(lambda: any(e.kind is ServerEventKind.TUNNEL_OPEN for e in events))
        opened = next(e for e in events if e.kind is ServerEventKind.TUNNEL_OPEN)
        assert opened.user == "alpha"
        assert opened.ports == (int(alpha_port),)
        assert opened.address is not None
        assert [s.user for s in chisel.sessions.values()] == ["alpha"]
        # The reverse port reaches the client's local service.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(alpha_port))
        writer.write(b"hello\n")
        assert await reader.readline() == b"hello\n"
        writer.close()
        await writer.wait_closed()
        # Environment of both processes: nothing but what each needs.
        assert client.pid is not None
        assert Path(f"/proc/{client.pid}/environ").read_bytes() == b"AUTH=alpha:alpha-pass\x00"
        assert b"alpha-pass" not in Path(f"/proc/{client.pid}/cmdline").read_bytes()
        assert chisel.pid is not None
        assert Path(f"/proc/{chisel.pid}/environ").read_bytes() == b"CHISEL_KEY=common-test-seed\x00"
    finally:
        await client.stop()
        echo.close()
        await echo.wait_closed()
    await wait_until(lambda: any(e.kind is ServerEventKind.SESSION_CLOSED for e in events))
    closed = next(e for e in events if e.kind is ServerEventKind.SESSION_CLOSED)
    assert closed.ports == (int(alpha_port),)
    assert chisel.sessions == {}


@pytest.mark.integration
async def test_client_errors_are_reported(
    server: tuple[ChiselServer, list[ChiselServerEvent]], binary: ChiselBinary
) -> None:
    chisel, events = server
    assert chisel.url is not None
    assert chisel.fingerprint is not None
    users = json.loads(chisel.authfile.read_text())  # type: ignore[union-attr]
    beta_port = int(users["beta:beta-pass"][0].split(":")[-1].rstrip("$"))
    cases = [
        ({"password": "wrong"}, "refused the agent's credentials", ServerEventKind.LOGIN_FAILED),
        ({"tunnel_port": beta_port}, "refused the reverse remote", ServerEventKind.SESSION_FAILED),
        ({"fingerprint": "A" * 43 + "="}, "fingerprint does not match", None),
    ]
    for overrides, message, server_kind in cases:
        events.clear()
        values = {
            "server_url": chisel.url,
            "fingerprint": chisel.fingerprint,
            "user": "alpha",
            "password": "alpha-pass",
            "tunnel_port": 1,
            "api_port": 1,
            "max_retry_interval": 1,
        }
        values.update(overrides)
        client = ChiselClient(binary, **values)  # type: ignore[arg-type]
        await client.start()
        try:
            await wait_until(lambda c=client: c.state.last_error is not None)  # type: ignore[misc]
            assert message in (client.state.last_error or "")
            assert not client.connected
            if server_kind is not None:
                await wait_until(lambda k=server_kind: any(e.kind is k for e in events))  # type: ignore[misc]
        finally:
            await client.stop()


@pytest.mark.integration
async def test_server_restarts_after_a_kill_and_the_client_reconnects(
    server: tuple[ChiselServer, list[ChiselServerEvent]], binary: ChiselBinary
) -> None:
    import os
    import signal

    chisel, events = server
    assert chisel.url is not None
    assert chisel.fingerprint is not None
    users = json.loads(chisel.authfile.read_text())  # type: ignore[union-attr]
    alpha_port = int(users["alpha:alpha-pass"][0].split(":")[-1].rstrip("$"))
    client = ChiselClient(
        binary,
        server_url=chisel.url,
        fingerprint=chisel.fingerprint,
        user="alpha",
        password="alpha-pass",
        tunnel_port=alpha_port,
        api_port=1,
        max_retry_interval=1,
    )
    await client.start()
    try:
        assert await client.wait_connected(10)
        # The client reports "Connected" a moment before the server has bound the reverse port.
        await wait_until(lambda: any(e.kind is ServerEventKind.TUNNEL_OPEN for e in events))
        old = chisel.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await wait_until(lambda: any(e.kind is ServerEventKind.EXITED for e in events))
        await wait_until(lambda: chisel.running and chisel.pid != old, 15)
        assert chisel.restarts == 1
        await wait_until(lambda: sum(e.kind is ServerEventKind.TUNNEL_OPEN for e in events) >= 2, 15)
        assert await client.wait_connected(10)
    finally:
        await client.stop()


def test_stale_workdirs_of_dead_hubs_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from otterscale.common._chisel import remove_stale_workdirs

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"otterscale-chisel-{dead_pid}-abc"
    stale.mkdir()
    (stale / "users.json").write_text("{}")
    live = tmp_path / f"otterscale-chisel-{os.getpid()}-def"
    live.mkdir()
    unrelated = tmp_path / "otterscale-chisel-notapid-x"
    unrelated.mkdir()
    assert remove_stale_workdirs(tmp_path) == [stale]
    assert not stale.exists()
    assert live.exists()
    assert unrelated.exists()
