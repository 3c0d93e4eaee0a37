"""The `otterscale` command, shared flags, container-mode defaults and listen addresses."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from otterscale.common import (
    CONTAINER_CONFIG,
    ConfigError,
    UsageError,
    add_common_arguments,
    container_mode,
    parse_address,
    resolve_defaults,
)
from otterscale.common._cli import KNOWN_COMMANDS, CommandMain, _Command, _dispatch

# --------------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (":8299", ("", 8299)),
        ("0.0.0.0:8299", ("0.0.0.0", 8299)),  # noqa: S104
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("hub.example.com:80", ("hub.example.com", 80)),
        ("[::1]:8299", ("::1", 8299)),
        ("[::]:8299", ("::", 8299)),
        ("[fe80::1%eth0]:8299", ("fe80::1%eth0", 8299)),
        (":0", ("", 0)),
        (" :8299 ", ("", 8299)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("8299", "expected HOST:PORT or :PORT (did you mean :8299?)"),
        ("localhost", "expected HOST:PORT or :PORT"),
        ("", "expected HOST:PORT"),
        ("::1:8299", "IPv6 addresses in brackets"),
        ("[::1:8299", "missing ']'"),
        ("[::1]8299", "expected :PORT after ']'"),
        ("[nope]:8299", "is not an IPv6 address"),
        (":65536", "from 0 to 65535"),
        (":http", "from 0 to 65535"),
        (":", "from 0 to 65535"),
        (":-1", "from 0 to 65535"),
        ("bad host:80", "not a host name"),
        ("a/b:80", "not a host name"),
    ],
)
def test_parse_address_errors(address: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_address(address)
    assert fragment in str(caught.value)
    assert repr(address) in str(caught.value)


def test_usage_error_is_a_value_error_for_argparse() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--listen", type=parse_address)
    assert parser.parse_args(["--listen", ":1"]).listen == ("", 1)
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--listen", "nope"])


# --------------------------------------------------------------------------------------------------
# Common flags and defaults


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otterscale server")
    add_common_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_outside_a_container() -> None:
    options = resolve_defaults(_parse(), {})
    assert options.address == ":8299"
    assert (options.host, options.port) == ("", 8299)
    assert options.config == Path("otterscale.yaml")
    assert (options.log_level, options.log_format) == ("info", "text")
    assert options.container is False


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on", " true "])
def test_container_mode_defaults(value: str) -> None:
    options = resolve_defaults(_parse(), {"OTTERSCALE_CONTAINER": value})
    assert options.address == ":8299"
    assert options.config == Path("/etc/app/otterscale.yaml") == Path(CONTAINER_CONFIG)
    assert options.container is True


@pytest.mark.parametrize("environ", [{}, {"OTTERSCALE_CONTAINER": "true"}])
def test_explicit_flags_win(environ: dict[str, str]) -> None:
    args = _parse(
        "--address=127.0.0.1:9000", "--config=/tmp/my.yaml", "--log-level=DEBUG", "--log-format=json"
    )
    options = resolve_defaults(args, environ)
    assert (options.host, options.port, options.address) == ("127.0.0.1", 9000, "127.0.0.1:9000")
    assert options.config == Path("/tmp/my.yaml")
    assert (options.log_level, options.log_format) == ("debug", "json")


@pytest.mark.parametrize("value", ["false", "0", "no", "off", ""])
def test_container_mode_off(value: str) -> None:
    assert container_mode({"OTTERSCALE_CONTAINER": value}) is False
    assert resolve_defaults(_parse(), {"OTTERSCALE_CONTAINER": value}).config == Path("otterscale.yaml")


def test_container_mode_refuses_unclear_values() -> None:
    with pytest.raises(UsageError, match="OTTERSCALE_CONTAINER must be true or false, not 'maybe'"):
        container_mode({"OTTERSCALE_CONTAINER": "maybe"})


def test_container_mode_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTTERSCALE_CONTAINER", "true")
    assert container_mode() is True
    assert resolve_defaults(_parse()).config == Path(CONTAINER_CONFIG)
    monkeypatch.delenv("OTTERSCALE_CONTAINER")
    assert container_mode() is False


def test_bad_flags() -> None:
    with pytest.raises(UsageError, match="invalid address"):
        resolve_defaults(_parse("--address=8299"), {})
    with pytest.raises(UsageError, match="--config must not be empty"):
        resolve_defaults(_parse("--config="), {})
    with pytest.raises(SystemExit):
        _parse("--log-format=xml")


def test_namespace_without_the_common_flags_gets_defaults() -> None:
    options = resolve_defaults(argparse.Namespace(), {})
    assert options.address == ":8299"


# --------------------------------------------------------------------------------------------------
# The otterscale command


def _command(name: str, target: CommandMain, distribution: str = "otterscale-hub") -> _Command:
    return _Command(
        name=name, distribution=distribution, version="0.1.0", summary="Summary.", load=lambda: target
    )


def _run(args: list[str], commands: dict[str, _Command]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = _dispatch(args, commands, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_help_lists_installed_and_missing_commands() -> None:
    commands = {"server": _command("server", lambda argv: 0)}
    status, out, err = _run(["--help"], commands)
    assert status == 0
    assert not err
    assert re.search(r"^  server +Summary\. \(otterscale-hub 0\.1\.0\)$", out, re.M)
    assert re.search(r"^  agent +not installed: pip install otterscale-agent$", out, re.M)
    assert re.search(r"^  port-forward +not installed: pip install otterscale-cli$", out, re.M)
    assert _run(["-h"], commands)[1] == out == _run(["help"], commands)[1]


def test_no_arguments_prints_help_and_fails() -> None:
    status, out, err = _run([], {})
    assert status == 2
    assert not out
    assert "usage: otterscale <command>" in err


def test_dispatch_passes_the_remaining_arguments() -> None:
    seen: list[list[str]] = []

    def server(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    status, _, _ = _run(["server", "--address=:1", "x"], {"server": _command("server", server)})
    assert status == 3
    assert seen == [["--address=:1", "x"]]


def test_none_means_success() -> None:
    assert _run(["agent"], {"agent": _command("agent", lambda argv: None)})[0] == 0


@pytest.mark.parametrize(("name", "distribution"), sorted(KNOWN_COMMANDS.items()))
def test_missing_known_command_names_the_distribution(name: str, distribution: str) -> None:
    status, _, err = _run([name, "--help"], {})
    assert status == 2
    assert err == f"otterscale: the `{name}` command needs {distribution}: pip install {distribution}\n"


def test_unknown_command() -> None:
    status, _, err = _run(["serve"], {"server": _command("server", lambda argv: 0)})
    assert status == 2
    assert "unknown command `serve` (available: server)" in err


def test_unknown_option_before_the_command() -> None:
    status, _, err = _run(["--address=:1", "server"], {})
    assert status == 2
    assert "the command comes first" in err


def test_version() -> None:
    status, out, _ = _run(["--version"], {"server": _command("server", lambda argv: 0)})
    assert status == 0
    assert out.startswith("otterscale-common ")
    assert "otterscale-hub 0.1.0 (server)" in out


def test_command_that_fails_to_load() -> None:
    def broken() -> CommandMain:
        raise ImportError("No module named 'connectrpc'")

    command = _Command(name="server", distribution="otterscale-hub", version="0.1.0", summary="", load=broken)
    status, _, err = _run(["server"], {"server": command})
    assert status == 1
    assert (
        "cannot load the `server` command from otterscale-hub: ImportError: No module named 'connectrpc'"
        in err
    )


def test_config_and_usage_errors_are_printed_without_a_traceback() -> None:
    def config_error(argv: list[str]) -> int:
        raise ConfigError("otterscale.yaml", [("tunnel.server", "needs key_seed or key_file")])

    def usage_error(argv: list[str]) -> int:
        raise UsageError("invalid address '8299'")

    status, _, err = _run(["server"], {"server": _command("server", config_error)})
    assert (status, err) == (
        1,
        "otterscale server: otterscale.yaml: tunnel.server: needs key_seed or key_file\n",
    )
    status, _, err = _run(["server"], {"server": _command("server", usage_error)})
    assert (status, err) == (2, "otterscale server: error: invalid address '8299'\n")


def test_interrupt_exits_130() -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    assert _run(["agent"], {"agent": _command("agent", interrupted)})[0] == 130


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("otterscale")
    assert script.exists(), "reinstall otterscale-common: the console script is missing"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: otterscale <command>" in result.stdout
    for name in KNOWN_COMMANDS:
        assert f"  {name}" in result.stdout
