"""The chisel tunnel: the binary, its authfile, its log lines, and supervised server and client.

The hub runs :class:`ChiselServer` (reverse tunnels only, one user per cluster); each agent runs
:class:`ChiselClient`, which dials out to the hub and asks for the reverse remote
``R:127.0.0.1:<tunnel_port>:127.0.0.1:<api_port>``, so the hub reaches the agent at
``http://127.0.0.1:<tunnel_port>``. Both run under :class:`~otterscale.common.Supervisor`.

What is enforced here, and why (see architecture.md):

- chisel >= 1.11.5 (:data:`MIN_CHISEL_VERSION`): older servers check a user's allowed remotes
  only at the handshake, so one cluster's agent could open another cluster's port.
- The authfile is written (mode 0600, atomically) *before* the server starts: a chisel server
  with no users is open to anyone. Each user may open exactly one remote, anchored and escaped:
  ``^R:127\\.0\\.0\\.1:<port>$`` (chisel's patterns are unanchored regular expressions). Forward
  tunnels and SOCKS match no pattern, so they are refused.
- The server's environment is empty except ``CHISEL_KEY`` (the key seed: an environment variable
  is private to the user, a command-line argument is not). An inherited ``AUTH`` would add a
  full-access user; ``HOST``/``PORT`` would move the listener.
- The client's password travels in ``AUTH`` (environment), never in argv; ``--fingerprint`` is
  required (chisel silently skips the check when it is empty); ``--max-retry-interval`` is
  seconds, not chisel's five-minute default.

Connection state comes from chisel's verbose log (``-v``): :func:`parse_server_line` and
:func:`parse_client_line` turn lines into events. The formats are those of chisel 1.11/1.12;
unknown lines are ignored, so a format change degrades to "no event", never to a crash.

Never logs a password, a key seed or the authfile's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from ._errors import OtterscaleError
from ._supervisor import ProcessSpec, Supervisor

logger = logging.getLogger(__name__)

#: Oldest chisel accepted: 1.11.5 checks allowed remotes on every new tunnel, not just at login.
MIN_CHISEL_VERSION: tuple[int, int, int] = (1, 11, 5)
#: The address every reverse tunnel binds on the hub, and the agent's local address.
LOOPBACK = "127.0.0.1"

_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_FINGERPRINT_RE = re.compile(r"[A-Za-z0-9+/]{43}=")
_TIMESTAMP_RE = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)? ")
_INSTALL_HINT = "go install github.com/jpillora/chisel@v1.12.0"


class TunnelError(OtterscaleError):
    """The tunnel cannot be set up: chisel missing or too old, or invalid tunnel settings."""

    connect_code: ClassVar[str] = "failed_precondition"


# --------------------------------------------------------------------------------------------------
# The binary


@dataclass(frozen=True, slots=True)
class ChiselBinary:
    """A chisel executable whose version was checked."""

    path: Path
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        """``1.12.0``."""
        return ".".join(str(part) for part in self.version)


def find_chisel(path: str | os.PathLike[str] | None = None, *, search_path: str | None = None) -> Path:
    """The chisel executable: ``path`` if given, else ``chisel`` on ``search_path`` (default PATH).

    Raises :class:`TunnelError` saying how to get one when there is none.
    """
    if path is not None and str(path):
        candidate = Path(path)
        if not candidate.is_file():
            raise TunnelError(f"chisel binary {candidate} does not exist; install it with `{_INSTALL_HINT}`")
        if not os.access(candidate, os.X_OK):
            raise TunnelError(f"chisel binary {candidate} is not executable")
        return candidate
    found = shutil.which("chisel", path=search_path)
    if found is None:
        raise TunnelError(
            f"chisel was not found on PATH; install chisel >= {_version_text(MIN_CHISEL_VERSION)} "
            f"(`{_INSTALL_HINT}`) or pass its path with --chisel"
        )
    return Path(found)


def parse_chisel_version(text: str) -> tuple[int, int, int] | None:
    """The version in ``chisel --version`` output (``1.12.0`` or ``v1.12.0``), or None."""
    match = _VERSION_RE.search(text)
    if match is None:
        return None
    major, minor, patch = (int(group) for group in match.groups())
    return major, minor, patch


def check_chisel(
    path: str | os.PathLike[str] | None = None, *, search_path: str | None = None, timeout: float = 10.0
) -> ChiselBinary:
    """Find chisel (see :func:`find_chisel`) and check it is at least :data:`MIN_CHISEL_VERSION`.

    Runs ``chisel --version`` with an empty environment. Raises :class:`TunnelError` when the
    binary is missing, does not run, reports no version, or is too old.
    """
    binary = find_chisel(path, search_path=search_path)
    try:
        result = subprocess.run(  # a short synchronous check, at start-up only
            [str(binary), "--version"], env={}, capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise TunnelError(f"cannot run {binary} --version: {exc}") from exc
    output = (result.stdout + result.stderr).decode("utf-8", errors="replace").strip()
    version = parse_chisel_version(output.splitlines()[0] if output else "")
    if version is None or version == (0, 0, 0):
        raise TunnelError(
            f"cannot tell the version of {binary} (it printed {output[:80]!r}); "
            f"chisel >= {_version_text(MIN_CHISEL_VERSION)} is required (`{_INSTALL_HINT}`)"
        )
    if version < MIN_CHISEL_VERSION:
        raise TunnelError(
            f"{binary} is chisel {_version_text(version)}, older than the required "
            f"{_version_text(MIN_CHISEL_VERSION)}: older servers let one cluster's agent open another "
            f"cluster's tunnel port; upgrade with `{_INSTALL_HINT}`"
        )
    return ChiselBinary(path=binary, version=version)


def _version_text(version: tuple[int, int, int]) -> str:
    return ".".join(str(part) for part in version)


def _as_binary(binary: ChiselBinary | str | os.PathLike[str]) -> Path:
    return binary.path if isinstance(binary, ChiselBinary) else Path(binary)


# --------------------------------------------------------------------------------------------------
# The authfile


@dataclass(frozen=True, slots=True)
class TunnelUser:
    """One agent's tunnel account: it may open exactly the reverse remote on ``port``."""

    user: str
    password: str = field(repr=False)
    port: int

    def __post_init__(self) -> None:
        if not self.user or ":" in self.user or any(c.isspace() for c in self.user):
            raise TunnelError("a tunnel user name must be non-empty, without ':' or spaces")
        if not self.password:
            raise TunnelError(f"tunnel user {self.user!r} has an empty password")
        if not 1 <= self.port <= 65535:
            raise TunnelError(f"tunnel user {self.user!r}: port {self.port} is out of range")


def reverse_remote_pattern(port: int) -> str:
    """The authfile pattern that allows only ``R:127.0.0.1:<port>``: ``^R:127\\.0\\.0\\.1:<port>$``."""
    return f"^R:{re.escape(LOOPBACK)}:{int(port)}$"


def authfile_content(users: Iterable[TunnelUser]) -> str:
    """The JSON text of a chisel authfile for ``users`` (it contains the passwords)."""
    entries: dict[str, list[str]] = {}
    ports: dict[int, str] = {}
    for account in users:
        if account.port in ports:
            raise TunnelError(
                f"tunnel users {ports[account.port]!r} and {account.user!r} share port {account.port}"
            )
        key = f"{account.user}:{account.password}"
        if any(existing.split(":", 1)[0] == account.user for existing in entries):
            raise TunnelError(f"tunnel user {account.user!r} is listed twice")
        ports[account.port] = account.user
        entries[key] = [reverse_remote_pattern(account.port)]
    if not entries:
        raise TunnelError("no tunnel users: a chisel server without users would accept anyone")
    return json.dumps(entries, indent=2, sort_keys=True) + "\n"


def write_authfile(path: str | os.PathLike[str], users: Iterable[TunnelUser]) -> Path:
    """Write the authfile atomically with mode 0600 (never readable by others, even briefly)."""
    target = Path(path)
    content = authfile_content(users).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=".authfile-", dir=target.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


# --------------------------------------------------------------------------------------------------
# Log lines


def _strip_timestamp(line: str) -> str:
    return _TIMESTAMP_RE.sub("", line.strip(), count=1)


class ServerEventKind(enum.Enum):
    """What a chisel server log line reports."""

    FINGERPRINT = "fingerprint"  #: detail = the SHA256 fingerprint
    LISTENING = "listening"  #: address = the server URL
    SESSION_OPEN = "session_open"  #: session, user, address (the agent's), ports requested
    TUNNEL_OPEN = "tunnel_open"  #: session, ports (one), user and address from the session
    SESSION_CLOSED = "session_closed"  #: session, user, address, ports, detail = duration [; error]
    LOGIN_FAILED = "login_failed"  #: user, address
    SESSION_FAILED = "session_failed"  #: session, detail = reason, ports named by the reason
    EXITED = "exited"  #: the server process ended; detail = how (synthetic, not a log line)


@dataclass(frozen=True, slots=True)
class ChiselServerEvent:
    """One event of the chisel server. Fields that a kind does not use are None or empty."""

    kind: ServerEventKind
    session: int | None = None
    user: str | None = None
    address: str | None = None
    ports: tuple[int, ...] = ()
    detail: str | None = None


_SESSION = r"^server: session#(?P<session>\d+): "
_SERVER_PATTERNS: tuple[tuple[re.Pattern[str], ServerEventKind], ...] = (
    (re.compile(r"^server: Fingerprint (?P<detail>\S+)$"), ServerEventKind.FINGERPRINT),
    (re.compile(r"^server: Listening on (?P<address>\S+)$"), ServerEventKind.LISTENING),
    (
        re.compile(_SESSION + r"Open \(user=(?P<user>\S*) addr=(?P<address>\S+) remotes=(?P<remotes>.*)\)$"),
        ServerEventKind.SESSION_OPEN,
    ),
    (
        re.compile(_SESSION + r"tun: proxy#R:(?P<host>[^=]*?):(?P<port>\d+)=>.*: Listening$"),
        ServerEventKind.TUNNEL_OPEN,
    ),
    (
        re.compile(
            _SESSION + r"Close \(user=(?P<user>\S*) addr=(?P<address>\S+) duration=(?P<detail>\S+)\)"
            r"(?: \(error (?P<error>.*)\))?$"
        ),
        ServerEventKind.SESSION_CLOSED,
    ),
    (
        re.compile(r'^server: Login failed for user "?(?P<user>.*?)"? \((?P<address>\S+)\)$'),
        ServerEventKind.LOGIN_FAILED,
    ),
    (re.compile(_SESSION + r"Failed: (?P<detail>.*)$"), ServerEventKind.SESSION_FAILED),
)
_REMOTE_PORT_RE = re.compile(r"R:[^:,\s']*:(\d+)")


def parse_server_line(line: str) -> ChiselServerEvent | None:
    """The event a chisel server log line reports, or None for any other line."""
    text = _strip_timestamp(line)
    for pattern, kind in _SERVER_PATTERNS:
        match = pattern.match(text)
        if match is None:
            continue
        groups = match.groupdict()
        session = int(groups["session"]) if groups.get("session") else None
        ports: tuple[int, ...] = ()
        if kind is ServerEventKind.TUNNEL_OPEN:
            ports = (int(groups["port"]),)
        elif kind is ServerEventKind.SESSION_OPEN:
            ports = tuple(int(p) for p in _REMOTE_PORT_RE.findall(groups["remotes"]))
        elif kind is ServerEventKind.SESSION_FAILED:
            ports = tuple(int(p) for p in _REMOTE_PORT_RE.findall(groups["detail"]))
        detail = groups.get("detail")
        if groups.get("error"):
            detail = f"{detail}; error {groups['error']}"
        return ChiselServerEvent(
            kind=kind,
            session=session,
            user=groups.get("user"),
            address=groups.get("address"),
            ports=ports,
            detail=detail,
        )
    return None


class ClientEventKind(enum.Enum):
    """What a chisel client log line reports."""

    CONNECTING = "connecting"  #: address = the server URL
    FINGERPRINT = "fingerprint"  #: detail = the server's fingerprint as seen by the client
    CONNECTED = "connected"  #: detail = the measured latency
    DISCONNECTED = "disconnected"
    ERROR = "error"  #: detail = the connection error (authentication, fingerprint, refused remote)
    RETRYING = "retrying"  #: detail = the delay
    EXITED = "exited"  #: the client process ended; detail = how (synthetic, not a log line)


@dataclass(frozen=True, slots=True)
class ChiselClientEvent:
    """One event of the chisel client."""

    kind: ClientEventKind
    address: str | None = None
    detail: str | None = None


_CLIENT_PATTERNS: tuple[tuple[re.Pattern[str], ClientEventKind], ...] = (
    (re.compile(r"^client: Connecting to (?P<address>\S+)$"), ClientEventKind.CONNECTING),
    (re.compile(r"^client: Fingerprint (?P<detail>\S+)$"), ClientEventKind.FINGERPRINT),
    (re.compile(r"^client: Connected \(Latency (?P<detail>[^)]*)\)$"), ClientEventKind.CONNECTED),
    (re.compile(r"^client: Disconnected$"), ClientEventKind.DISCONNECTED),
    (
        re.compile(r"^client: Connection error: (?P<detail>.*?)(?: \(Attempt: [^)]*\))?$"),
        ClientEventKind.ERROR,
    ),
    (re.compile(r"^client: Retrying in (?P<detail>\S+?)\.*$"), ClientEventKind.RETRYING),
)


def parse_client_line(line: str) -> ChiselClientEvent | None:
    """The event a chisel client log line reports, or None for any other line."""
    text = _strip_timestamp(line)
    for pattern, kind in _CLIENT_PATTERNS:
        match = pattern.match(text)
        if match is not None:
            groups = match.groupdict()
            return ChiselClientEvent(kind=kind, address=groups.get("address"), detail=groups.get("detail"))
    return None


# --------------------------------------------------------------------------------------------------
# Server


@dataclass(frozen=True, slots=True)
class TunnelSession:
    """A connected agent as the server sees it: who, from where, since when, which ports."""

    session: int
    user: str
    address: str
    opened_at: float  #: wall-clock seconds (time.time())
    ports: tuple[int, ...] = ()


_WORKDIR_PREFIX = "otterscale-chisel-"


def remove_stale_workdirs(temp_root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove work directories (authfiles with agent passwords) of hub processes that died.

    A clean stop removes its own directory, but a SIGKILLed hub cannot. Directory names carry the
    creating process id; those of ours whose process is gone are deleted. Returns what was removed.
    """
    root = Path(temp_root if temp_root is not None else tempfile.gettempdir())
    removed: list[Path] = []
    for entry in root.glob(f"{_WORKDIR_PREFIX}*-*"):
        pid_text = entry.name[len(_WORKDIR_PREFIX) :].split("-", 1)[0]
        try:
            pid = int(pid_text)
            if not entry.is_dir() or entry.is_symlink() or entry.stat().st_uid != os.getuid():
                continue
        except (ValueError, OSError):
            continue
        if pid == os.getpid() or _process_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        logger.info("removed %d stale tunnel work directories of hub processes that died", len(removed))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChiselServer:
    """``chisel server`` for reverse tunnels, supervised (see the module docstring).

    ``on_event`` receives every :class:`ChiselServerEvent`, in order, on the event loop;
    ``TUNNEL_OPEN`` events carry the session's user and address, and a synthetic ``EXITED``
    event follows every exit of the process (all sessions are gone then). ``sessions`` is the
    current table.

    The authfile lives in a private temporary directory (mode 0700) created by :meth:`start`
    and removed by :meth:`stop`, unless ``workdir`` is given.
    """

    def __init__(
        self,
        binary: ChiselBinary | str | os.PathLike[str],
        *,
        host: str,
        port: int,
        users: Sequence[TunnelUser],
        key_seed: str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        keepalive_seconds: float = 10.0,
        workdir: str | os.PathLike[str] | None = None,
        on_event: Callable[[ChiselServerEvent], None] | None = None,
        on_restart: Callable[[int], None] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if (key_seed is None) == (key_file is None):
            raise TunnelError("the tunnel server needs exactly one of key_seed or key_file")
        if key_seed is not None and not key_seed:
            raise TunnelError("the tunnel key seed is empty")
        if not users:
            raise TunnelError("no tunnel users: a chisel server without users would accept anyone")
        authfile_content(users)  # validates: unique users and ports
        self._binary = _as_binary(binary)
        self._host = host
        self._port = port
        self._users = tuple(users)
        self._key_seed = key_seed
        self._key_file = Path(key_file) if key_file is not None else None
        self._keepalive = keepalive_seconds
        self._workdir = Path(workdir) if workdir is not None else None
        self._own_workdir: Path | None = None
        self._on_event = on_event
        self._on_restart = on_restart
        self._backoff = (backoff_initial, backoff_max)
        self._stop_timeout = stop_timeout
        self._supervisor: Supervisor | None = None
        self._sessions: dict[int, TunnelSession] = {}
        self.fingerprint: str | None = None
        self.url: str | None = None
        self.authfile: Path | None = None

    @property
    def sessions(self) -> dict[int, TunnelSession]:
        """Open sessions by session number (a copy)."""
        return dict(self._sessions)

    @property
    def running(self) -> bool:
        """Whether the chisel server process is alive and listening."""
        return self._supervisor is not None and self._supervisor.running and self._supervisor.is_ready

    @property
    def restarts(self) -> int:
        """How many times the process was restarted after an unexpected exit."""
        return self._supervisor.restarts if self._supervisor is not None else 0

    @property
    def pid(self) -> int | None:
        """The pid of the running chisel server, or None."""
        return self._supervisor.pid if self._supervisor is not None else None

    def process_spec(self, authfile: Path) -> ProcessSpec:
        """The argv and (clean) environment the server runs with."""
        argv = [
            str(self._binary),
            "server",
            "-v",
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--reverse",
            "--authfile",
            str(authfile),
            "--keepalive",
            f"{self._keepalive:g}s",
        ]
        env: dict[str, str] = {}
        if self._key_file is not None:
            argv += ["--keyfile", str(self._key_file)]
        else:
            assert self._key_seed is not None
            env["CHISEL_KEY"] = self._key_seed  # chisel's --key default; private, unlike argv
        return ProcessSpec(name="chisel-server", argv=argv, env=env)

    async def start(self, ready_timeout: float = 15.0) -> None:
        """Write the authfile, start the server and wait until it listens.

        Raises :class:`~otterscale.common.ProcessError` with chisel's own words when it does not
        come up (port in use, unreadable key file, ...).
        """
        if self._supervisor is not None:
            raise RuntimeError("the chisel server was already started")
        directory = self._workdir
        if directory is None:
            remove_stale_workdirs()
            directory = self._own_workdir = Path(tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-"))
        os.chmod(directory, 0o700)
        self.authfile = write_authfile(directory / "users.json", self._users)
        self._supervisor = Supervisor(
            self.process_spec(self.authfile),
            ready=lambda line: _kind(line) is ServerEventKind.LISTENING,
            on_output=self._on_line,
            on_exit=self._on_exit,
            on_restart=self._restarted,
            backoff_initial=self._backoff[0],
            backoff_max=self._backoff[1],
            stop_timeout=self._stop_timeout,
        )
        try:
            await self._supervisor.start(ready_timeout)
        except BaseException:
            self._cleanup()
            raise

    async def stop(self) -> None:
        """Stop the server (bounded) and remove the authfile it was given."""
        if self._supervisor is not None:
            await self._supervisor.stop()
        self._cleanup()

    def update_users(self, users: Sequence[TunnelUser]) -> None:
        """Rewrite the authfile; chisel reloads it for new connections and new tunnels."""
        authfile_content(users)
        self._users = tuple(users)
        if self.authfile is not None:
            write_authfile(self.authfile, self._users)

    def _cleanup(self) -> None:
        if self._own_workdir is not None:
            shutil.rmtree(self._own_workdir, ignore_errors=True)
            self._own_workdir = None

    def _restarted(self, count: int) -> None:
        if self._on_restart is not None:
            self._on_restart(count)

    def _on_line(self, line: str) -> None:
        event = parse_server_line(line)
        if event is None:
            return
        now = time.time()
        if event.kind is ServerEventKind.FINGERPRINT:
            self.fingerprint = event.detail
        elif event.kind is ServerEventKind.LISTENING:
            self.url = event.address
        elif event.kind is ServerEventKind.SESSION_OPEN and event.session is not None:
            self._sessions[event.session] = TunnelSession(
                session=event.session, user=event.user or "", address=event.address or "", opened_at=now
            )
        elif event.kind is ServerEventKind.TUNNEL_OPEN and event.session is not None:
            known = self._sessions.get(event.session)
            if known is not None:
                self._sessions[event.session] = replace(known, ports=known.ports + event.ports)
                event = replace(event, user=known.user, address=known.address)
        elif event.kind is ServerEventKind.SESSION_CLOSED and event.session is not None:
            closed = self._sessions.pop(event.session, None)
            if closed is not None:
                event = replace(event, ports=closed.ports)
        self._emit(event)

    def _on_exit(self, code: int) -> None:
        self._sessions.clear()
        self._emit(ChiselServerEvent(kind=ServerEventKind.EXITED, detail=_exit_text(code)))

    def _emit(self, event: ChiselServerEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)


def _kind(line: str) -> ServerEventKind | None:
    event = parse_server_line(line)
    return event.kind if event is not None else None


def _exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"


# --------------------------------------------------------------------------------------------------
# Client


@dataclass(frozen=True, slots=True)
class ChiselClientState:
    """What an agent knows about its tunnel: up or down, since when, and the last problem."""

    connected: bool = False
    since: float = field(default_factory=time.time)  #: wall-clock seconds of the last change
    last_error: str | None = None
    attempts: int = 0  #: connection attempts that failed since the last success
    server_fingerprint: str | None = None  #: the fingerprint the server presented last


class ChiselClient:
    """``chisel client`` with one reverse remote, supervised (see the module docstring).

    ``state`` tells whether the tunnel is up (for the agent's probes and logs); ``on_state``
    receives every new state. Connect and disconnect are logged at INFO and WARNING, a failure to
    connect at WARNING once per distinct reason (its repeats at DEBUG).
    """

    def __init__(
        self,
        binary: ChiselBinary | str | os.PathLike[str],
        *,
        server_url: str,
        fingerprint: str | None,
        user: str,
        password: str,
        tunnel_port: int,
        api_port: int,
        api_host: str = LOOPBACK,
        max_retry_interval: float = 3.0,
        keepalive_seconds: float = 10.0,
        on_state: Callable[[ChiselClientState], None] | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        if not fingerprint:
            raise TunnelError(
                "the tunnel server's fingerprint is required (chisel skips the check without one): "
                "run `otterscale server --print-fingerprint` with the hub's configuration (the hub "
                "also logs it at start-up) and put it in clusters.<name>.agent.fingerprint"
            )
        if not _FINGERPRINT_RE.fullmatch(fingerprint):
            raise TunnelError(
                "the tunnel fingerprint must be the base64 SHA256 fingerprint the hub logs at start-up "
                "(44 characters ending in '=')"
            )
        parts = urlsplit(server_url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise TunnelError(f"tunnel server URL {server_url!r} must be http(s)://HOST:PORT")
        if parts.username or parts.password:
            raise TunnelError("put the tunnel credentials in the agent's auth settings, not in the URL")
        if max_retry_interval < 1:
            raise TunnelError(
                "max_retry_interval must be at least 1 second (chisel turns less into 5 minutes)"
            )
        TunnelUser(user=user, password=password, port=tunnel_port)  # validates user, password, port
        if not 1 <= api_port <= 65535:
            raise TunnelError(f"api port {api_port} is out of range")
        self._binary = _as_binary(binary)
        self._server_url = server_url
        self._fingerprint = fingerprint
        self._user = user
        self._password = password
        self.remote = f"R:{LOOPBACK}:{tunnel_port}:{api_host}:{api_port}"
        self._max_retry = max_retry_interval
        self._keepalive = keepalive_seconds
        self._on_state = on_state
        self._stop_timeout = stop_timeout
        self._supervisor: Supervisor | None = None
        self._state = ChiselClientState()
        self._changed = asyncio.Event()

    @property
    def state(self) -> ChiselClientState:
        """The current tunnel state."""
        return self._state

    @property
    def connected(self) -> bool:
        """Whether the tunnel is up right now."""
        return self._state.connected

    @property
    def pid(self) -> int | None:
        """The pid of the running chisel client, or None."""
        return self._supervisor.pid if self._supervisor is not None else None

    @property
    def restarts(self) -> int:
        """How many times the process was restarted after an unexpected exit."""
        return self._supervisor.restarts if self._supervisor is not None else 0

    def process_spec(self) -> ProcessSpec:
        """The argv (no secrets) and environment (only ``AUTH``) the client runs with."""
        argv = [
            str(self._binary),
            "client",
            "-v",
            "--fingerprint",
            self._fingerprint,
            "--max-retry-interval",
            f"{self._max_retry:g}s",
            "--keepalive",
            f"{self._keepalive:g}s",
            self._server_url,
            self.remote,
        ]
        return ProcessSpec(name="chisel-client", argv=argv, env={"AUTH": f"{self._user}:{self._password}"})

    async def start(self, ready_timeout: float = 10.0) -> None:
        """Start the client; returns once it runs (not necessarily connected: see wait_connected)."""
        if self._supervisor is not None:
            raise RuntimeError("the chisel client was already started")
        self._supervisor = Supervisor(
            self.process_spec(),
            ready=lambda line: parse_client_line(line) is not None,
            on_output=self._on_line,
            on_exit=self._on_exit,
            stop_timeout=self._stop_timeout,
            backoff_max=self._max_retry,
        )
        await self._supervisor.start(ready_timeout)

    async def stop(self) -> None:
        """Stop the client (bounded); the tunnel goes down."""
        if self._supervisor is not None:
            await self._supervisor.stop()

    async def wait_connected(self, within: float) -> bool:
        """Wait until the tunnel is up; False if it is not within ``within`` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        while not self._state.connected:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    def _on_line(self, line: str) -> None:
        event = parse_client_line(line)
        if event is None:
            return
        state = self._state
        if event.kind is ClientEventKind.FINGERPRINT:
            self._set(replace(state, server_fingerprint=event.detail))
        elif event.kind is ClientEventKind.CONNECTED:
            logger.info(
                "tunnel to %s connected (%s, latency %s)", self._server_url, self.remote, event.detail
            )
            self._set(replace(state, connected=True, since=time.time(), last_error=None, attempts=0))
        elif event.kind is ClientEventKind.DISCONNECTED:
            logger.warning("tunnel to %s disconnected", self._server_url)
            self._set(replace(state, connected=False, since=time.time()))
        elif event.kind is ClientEventKind.ERROR:
            reason = _client_error_reason(event.detail or "")
            # chisel retries every few seconds: warn once per distinct reason, not per attempt.
            level = logging.DEBUG if reason == state.last_error else logging.WARNING
            logger.log(level, "tunnel to %s: %s", self._server_url, reason)
            self._set(replace(state, last_error=reason, attempts=state.attempts + 1))

    def _on_exit(self, code: int) -> None:
        was_connected = self._state.connected
        self._set(
            replace(
                self._state,
                connected=False,
                since=time.time() if was_connected else self._state.since,
                last_error=f"chisel client {_exit_text(code)}",
            )
        )

    def _set(self, state: ChiselClientState) -> None:
        self._state = state
        self._changed.set()
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                logger.exception("tunnel state callback failed")


def _client_error_reason(detail: str) -> str:
    if "Invalid fingerprint" in detail:
        return (
            "the tunnel server's fingerprint does not match clusters.<name>.agent.fingerprint "
            f"(chisel: {detail})"
        )
    if "unable to authenticate" in detail:
        return f"the tunnel server refused the agent's credentials (chisel: {detail})"
    if "denied" in detail:
        return f"the tunnel server refused the reverse remote; check tunnel_port (chisel: {detail})"
    if "cannot listen" in detail:
        return (
            "the tunnel port is busy on the hub: is another agent of this cluster connected? "
            f"(chisel: {detail})"
        )
    return detail
