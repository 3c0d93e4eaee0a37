"""A real Keycloak on loopback for tests and the demo: dev mode, one imported realm, real tokens.

:func:`start_keycloak` runs the Quarkus distribution from the tools cache (fetched by
``nox -s tools -- keycloak``) in dev mode with a generated realm ``otterscale``: a public client
``otterscale`` whose access tokens carry ``aud: otterscale`` and a flat ``groups`` claim, a second
client (``other-app``) whose tokens carry another audience, and users in different groups. Tokens
come from the password grant.

Each instance gets its own Keycloak home (``bin/kc.sh``, ``conf/``, ``lib/quarkus/`` and ``data/``
copied or written per instance, the 170 MB of jars in ``lib/lib`` symlinked), because dev mode
rewrites ``lib/quarkus`` (re-augmentation) and keeps its H2 database under ``data/``: parallel
instances share nothing, and the cached distribution is never written to. The first instance's
augmented ``lib/quarkus`` is kept in the tools cache, so later instances skip the ~20 s rebuild.

The child gets an allow-listed environment (an inherited ``KC_*`` variable would reconfigure it).
Never logs a password or token, nor puts one into an error message (the test users' passwords are
in the realm file under the instance directory, which is disposable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._process import ManagedProcess, free_port
from .tools import KEYCLOAK_VERSION, cache_root, keycloak_home

logger = logging.getLogger(__name__)

#: The realm every instance imports.
REALM = "otterscale"
#: The client whose tokens the hub accepts (their ``aud`` contains it).
CLIENT_ID = "otterscale"
#: A second public client whose tokens say ``aud: other-app`` (for "wrong audience" tests).
OTHER_CLIENT_ID = "other-app"
#: JDK major versions Keycloak 26 supports, most preferred first.
SUPPORTED_JAVA = (25, 21, 17)
#: Options fixed at Keycloak's build (augmentation) step; part of the augmentation cache key.
_BUILD_OPTIONS = ("--health-enabled=true",)
#: Dev mode on 2 cores: ~40 s with Keycloak's build step, ~20 s with it cached, ~10 s to restart.
DEFAULT_START_TIMEOUT = 240.0

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class KeycloakError(RuntimeError):
    """Keycloak could not be reached, or answered a request with an error."""


class TokenRequestError(KeycloakError):
    """Keycloak refused a token request (wrong password, unknown user, disabled client...)."""

    def __init__(self, message: str, *, status: int, error: str, description: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.description = description


@dataclasses.dataclass(frozen=True)
class KeycloakUser:
    """A user of the test realm. ``groups`` are flat names (the ``groups`` claim lists them)."""

    username: str
    password: str
    groups: tuple[str, ...] = ()


#: The users every instance starts with.
DEFAULT_USERS: tuple[KeycloakUser, ...] = (
    KeycloakUser("alice", "alice-password", ("team-a",)),
    KeycloakUser("bob", "bob-password", ("team-b",)),
    KeycloakUser("carol", "carol-password", ("team-a", "ops")),
)


class Keycloak:
    """One Keycloak instance. Use :func:`start_keycloak`; call :meth:`stop` when done.

    :meth:`stop` then :meth:`start` brings it back on the same ports with the same database, so
    the issuer, the signing keys (tokens issued before stay valid) and added users survive.
    """

    def __init__(
        self,
        directory: Path,
        *,
        users: Iterable[KeycloakUser],
        java_home: Path,
        heap: str,
        access_token_lifespan: int,
    ) -> None:
        self.directory = directory
        self.home = directory / "home"
        self.log_file = directory / "keycloak.log"
        self.java_home = java_home
        self.heap = heap
        self.access_token_lifespan = access_token_lifespan
        self.users: dict[str, KeycloakUser] = {u.username: u for u in users}
        self.port = 0
        self.management_port = 0
        #: Seconds the last :meth:`start` took until the realm was served.
        self.startup_seconds = 0.0
        #: Seconds of each start so far (the first may include Keycloak's augmentation step).
        self.startup_history: list[float] = []
        self.process: ManagedProcess | None = None
        # A temporary admin service account in the master realm, for add_user(); per instance.
        self._admin_client_id = "otterscale-testing-admin"
        self._admin_secret = secrets.token_urlsafe(24)

    # --- addresses ---------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return REALM

    @property
    def realm_url(self) -> str:
        """The issuer (``iss`` of every token): ``http://127.0.0.1:<port>/realms/otterscale``."""
        return f"{self.base_url}/realms/{REALM}"

    @property
    def client_id(self) -> str:
        return CLIENT_ID

    @property
    def other_client_id(self) -> str:
        """A client of the same realm whose tokens have ``aud: other-app``, not ``otterscale``."""
        return OTHER_CLIENT_ID

    @property
    def token_endpoint(self) -> str:
        return f"{self.realm_url}/protocol/openid-connect/token"

    @property
    def discovery_url(self) -> str:
        return f"{self.realm_url}/.well-known/openid-configuration"

    # --- tokens ------------------------------------------------------------------------------------

    def token_response(
        self,
        username: str,
        password: str | None = None,
        *,
        client_id: str | None = None,
        scope: str = "openid",
    ) -> dict[str, Any]:
        """The token endpoint's JSON for a password grant (``access_token``, ``expires_in``, ...).

        ``password`` defaults to the known password of a realm user. Raises
        :class:`TokenRequestError` when Keycloak refuses, :class:`KeycloakError` when it is down.
        """
        if password is None:
            if username not in self.users:
                raise KeyError(f"no known password for {username!r}; pass one")
            password = self.users[username].password
        client = client_id or CLIENT_ID
        form = {
            "grant_type": "password",
            "client_id": client,
            "username": username,
            "password": password,
            "scope": scope,
        }
        try:
            return _post_form(self.token_endpoint, form)
        except _HTTPStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            error = str(body.get("error", "")) or "unknown_error"
            description = str(body.get("error_description", "")) or str(exc.body)[:200]
            raise TokenRequestError(
                f"Keycloak refused a token for user {username!r} (client {client!r}): "
                f"HTTP {exc.status} {error}: {description}",
                status=exc.status,
                error=error,
                description=description,
            ) from None

    def token(self, username: str, password: str | None = None, *, client_id: str | None = None) -> str:
        """A fresh access token (a signed JWT) for ``username`` by the password grant."""
        token = self.token_response(username, password, client_id=client_id).get("access_token")
        if not isinstance(token, str) or not token:
            raise KeycloakError(f"token response for {username!r} has no access_token")
        return token

    # --- realm administration ------------------------------------------------------------------

    def add_user(
        self, username: str, password: str, groups: Iterable[str] = (), *, enabled: bool = True
    ) -> KeycloakUser:
        """Create a user (and any missing group) in the realm through the admin REST API."""
        if not _NAME_RE.fullmatch(username):
            raise ValueError(f"username {username!r} must be a short lower-case name")
        group_names = tuple(groups)
        admin = self._admin_token()
        group_ids = {name: self._ensure_group(admin, name) for name in group_names}
        representation = {
            "username": username,
            "enabled": enabled,
            **_profile(username),
            "credentials": [{"type": "password", "value": password, "temporary": False}],
        }
        status, headers, _ = _request("POST", f"{self._admin_url}/users", admin, json_body=representation)
        user_id = headers.get("Location", "").rstrip("/").rsplit("/", 1)[-1]
        if status != 201 or not user_id:
            raise KeycloakError(f"creating user {username!r} returned HTTP {status}")
        for name, group_id in group_ids.items():
            _request("PUT", f"{self._admin_url}/users/{user_id}/groups/{group_id}", admin)
            logger.debug("user %s joined group %s", username, name)
        user = KeycloakUser(username, password, group_names)
        self.users[username] = user
        return user

    @property
    def _admin_url(self) -> str:
        return f"{self.base_url}/admin/realms/{REALM}"

    def _admin_token(self) -> str:
        response = _post_form(
            f"{self.base_url}/realms/master/protocol/openid-connect/token",
            {
                "grant_type": "client_credentials",
                "client_id": self._admin_client_id,
                "client_secret": self._admin_secret,
            },
        )
        return str(response["access_token"])

    def _ensure_group(self, admin: str, name: str) -> str:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"group {name!r} must be a short lower-case name")
        query = urllib.parse.urlencode({"search": name, "exact": "true"})
        _, _, found = _request("GET", f"{self._admin_url}/groups?{query}", admin)
        for group in found or []:
            if group.get("name") == name:
                return str(group["id"])
        status, headers, _ = _request("POST", f"{self._admin_url}/groups", admin, json_body={"name": name})
        group_id = headers.get("Location", "").rstrip("/").rsplit("/", 1)[-1]
        if status != 201 or not group_id:
            raise KeycloakError(f"creating group {name!r} returned HTTP {status}")
        return group_id

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Start (or start again, on the same ports and data) and wait until the realm is served."""
        if self.running:
            raise RuntimeError("Keycloak is already running")
        if not self.port:
            self.port, self.management_port = free_port(), free_port()
        argv = [
            str(self.home / "bin" / "kc.sh"),
            "start-dev",
            *_BUILD_OPTIONS,
            "--http-host=127.0.0.1",
            f"--http-port={self.port}",
            f"--http-management-port={self.management_port}",
            # A fixed issuer, whatever host name a client uses to reach it.
            f"--hostname={self.base_url}",
            "--import-realm",
            "--log-console-color=false",
        ]
        env = _child_env(
            {
                "JAVA_HOME": str(self.java_home),
                # kc.sh runs the JVM as its child; the wrapper gives the JVM the parent-death
                # signal too, so a SIGKILLed test run cannot leave an orphaned Keycloak behind.
                "JAVA": str(self.home / "bin" / _JAVA_WRAPPER),
                "JAVA_OPTS_KC_HEAP": f"-Xms64m -Xmx{self.heap}",
                # C1 only: on 2 cores a restart takes ~7 s instead of ~14 s, and ~90 MB less RSS.
                # Peak throughput does not matter for a test identity provider.
                "JAVA_OPTS_APPEND": "-XX:TieredStopAtLevel=1",
                # Only used when the master realm is created (the first start of this instance).
                "KC_BOOTSTRAP_ADMIN_CLIENT_ID": self._admin_client_id,
                "KC_BOOTSTRAP_ADMIN_CLIENT_SECRET": self._admin_secret,
            }
        )
        started = time.monotonic()
        self.process = ManagedProcess("keycloak", argv, self.log_file, env=env, cwd=self.directory)
        self.process.wait_until(self._ready, timeout=timeout, what=f"serving realm {REALM}")
        self.startup_seconds = time.monotonic() - started
        self.startup_history.append(self.startup_seconds)
        logger.info("Keycloak ready at %s in %.1fs", self.realm_url, self.startup_seconds)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Keycloak (SIGTERM to its process group, then SIGKILL). Safe to call twice."""
        if self.process is not None:
            self.process.stop(timeout=timeout)
            self.process = None

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """:meth:`stop`, then :meth:`start` on the same ports and data."""
        self.stop()
        self.start(timeout=timeout)

    def rss_bytes(self) -> int:
        """Resident memory of Keycloak's processes (the JVM and its launcher script), in bytes."""
        if self.process is None:
            return 0
        return _group_rss(self.process.pid)

    def _ready(self) -> bool:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.management_port}/health/ready", timeout=5
        ) as resp:
            if resp.status != 200:
                return False
        with urllib.request.urlopen(self.discovery_url, timeout=5) as resp:  # noqa: S310
            return bool(resp.status == 200)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"Keycloak(realm_url={self.realm_url!r}, {state})"


#: Starts tried when the ports chosen for Keycloak were taken before it bound them.
_BIND_ATTEMPTS = 3


def start_keycloak(
    directory: Path,
    *,
    users: Iterable[KeycloakUser] = DEFAULT_USERS,
    java_home: Path | None = None,
    heap: str = "512m",
    access_token_lifespan: int = 900,
    timeout: float = DEFAULT_START_TIMEOUT,
) -> Keycloak:
    """Start Keycloak in dev mode under ``directory`` and wait until the realm is served.

    Raises :class:`otterscale.testing.tools.ToolMissingError` (naming the command that fetches
    the distribution) before starting anything if it is missing, and :class:`KeycloakError` when
    no supported JDK is found.
    """
    dist = keycloak_home()
    java = java_home or find_java_home()
    user_list = list(users)
    for user in user_list:
        if not _NAME_RE.fullmatch(user.username) or not all(_NAME_RE.fullmatch(g) for g in user.groups):
            raise ValueError(f"user {user.username!r}: names must be short lower-case names")
    directory.mkdir(parents=True, exist_ok=True)
    kc = Keycloak(
        directory,
        users=user_list,
        java_home=java,
        heap=heap,
        access_token_lifespan=access_token_lifespan,
    )
    augmented = _augmentation_cache(java)
    _prepare_home(dist, kc.home, augmented if augmented.is_dir() else None, java)
    realm = realm_representation(user_list, access_token_lifespan=access_token_lifespan)
    (kc.home / "data" / "import" / f"{REALM}-realm.json").write_text(json.dumps(realm, indent=2))
    for attempt in range(1, _BIND_ATTEMPTS + 1):
        try:
            kc.start(timeout=timeout)
            break
        except RuntimeError as exc:
            kc.stop()
            # Keycloak binds its ports ~40 s after free_port() chose them; on a machine where
            # other test runs start servers meanwhile, one may have taken them. New ports, again.
            if "Port already bound" not in str(exc) or attempt == _BIND_ATTEMPTS:
                raise
            logger.warning(
                "Keycloak: port %d or %d was taken meanwhile; new ports", kc.port, kc.management_port
            )
            kc.port = kc.management_port = 0
        except BaseException:
            kc.stop()
            raise
    if not augmented.is_dir():
        _save_augmentation(kc.home / "lib" / "quarkus", augmented)
    return kc


# --- realm ---------------------------------------------------------------------------------------


def realm_representation(
    users: Iterable[KeycloakUser], *, access_token_lifespan: int = 900
) -> dict[str, Any]:
    """The realm JSON imported at start-up (Keycloak's RealmRepresentation format)."""
    user_list = list(users)
    groups = sorted({g for u in user_list for g in u.groups})
    groups_mapper = {
        "name": "groups",
        "protocol": "openid-connect",
        "protocolMapper": "oidc-group-membership-mapper",
        "config": {
            "claim.name": "groups",
            "full.path": "false",
            "access.token.claim": "true",
            "id.token.claim": "true",
            "userinfo.token.claim": "true",
            "introspection.token.claim": "true",
        },
    }

    def audience_mapper(audience: str) -> dict[str, Any]:
        return {
            "name": f"audience-{audience}",
            "protocol": "openid-connect",
            "protocolMapper": "oidc-audience-mapper",
            "config": {
                "included.client.audience": audience,
                "access.token.claim": "true",
                "id.token.claim": "false",
                "introspection.token.claim": "true",
            },
        }

    def public_client(client_id: str, mappers: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "clientId": client_id,
            "enabled": True,
            "protocol": "openid-connect",
            "publicClient": True,
            "directAccessGrantsEnabled": True,
            "standardFlowEnabled": False,
            "implicitFlowEnabled": False,
            "serviceAccountsEnabled": False,
            "protocolMappers": mappers,
        }

    return {
        "realm": REALM,
        "enabled": True,
        "sslRequired": "none",  # loopback only
        "accessTokenLifespan": access_token_lifespan,
        "bruteForceProtected": False,  # tests try wrong passwords on purpose
        # Test passwords need no costly hashing; Keycloak's default (argon2) makes every
        # password grant cost tens of milliseconds of CPU.
        "passwordPolicy": "hashAlgorithm(pbkdf2-sha256) and hashIterations(1000)",
        "groups": [{"name": g} for g in groups],
        "clients": [
            public_client(CLIENT_ID, [audience_mapper(CLIENT_ID), groups_mapper]),
            # Same users and groups, but the tokens are meant for another service.
            public_client(OTHER_CLIENT_ID, [audience_mapper(OTHER_CLIENT_ID), groups_mapper]),
        ],
        "users": [
            {
                "username": u.username,
                "enabled": True,
                **_profile(u.username),
                "credentials": [{"type": "password", "value": u.password, "temporary": False}],
                "groups": [f"/{g}" for g in u.groups],
            }
            for u in user_list
        ],
    }


def _profile(username: str) -> dict[str, Any]:
    # Keycloak's user profile requires these; without them the password grant answers
    # "Account is not fully set up".
    return {
        "email": f"{username}@example.test",
        "emailVerified": True,
        "firstName": username.capitalize(),
        "lastName": "Test",
    }


# --- Java and the per-instance home ------------------------------------------------------------------


def java_major(java_home: Path) -> int | None:
    """The major version of a JDK from its ``release`` file (no JVM start), or None."""
    try:
        text = (java_home / "release").read_text()
    except OSError:
        return None
    match = re.search(r'^JAVA_VERSION="(\d+)(?:\.(\d+))?', text, re.MULTILINE)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java_home(candidates: Iterable[Path] | None = None) -> Path:
    """The JDK to run Keycloak with: the newest supported major (25, then 21, then 17).

    Looks at ``$JAVA_HOME``, ``/usr/lib/jvm/*`` and the ``java`` on PATH unless ``candidates``
    are given. Raises :class:`KeycloakError` if none is supported.
    """
    if candidates is None:
        found: list[Path] = []
        if os.environ.get("JAVA_HOME"):
            found.append(Path(os.environ["JAVA_HOME"]))
        jvm = Path("/usr/lib/jvm")
        if jvm.is_dir():
            found += sorted(p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink())
        on_path = shutil.which("java")
        if on_path:
            found.append(Path(on_path).resolve().parent.parent)
        candidates = found
    ranked: list[tuple[int, Path]] = []
    seen: list[str] = []
    for home in candidates:
        major = java_major(home)
        seen.append(f"{home} ({major or 'unknown'})")
        if major in SUPPORTED_JAVA and (home / "bin" / "java").is_file():
            ranked.append((SUPPORTED_JAVA.index(major), home))
    if not ranked:
        raise KeycloakError(
            f"Keycloak {KEYCLOAK_VERSION} needs a JDK {' or '.join(map(str, sorted(SUPPORTED_JAVA)))}; "
            f"found: {', '.join(seen) or 'none'}"
        )
    return min(ranked, key=lambda r: r[0])[1]


def _augmentation_cache(java_home: Path) -> Path:
    key = hashlib.sha256(
        "\0".join((KEYCLOAK_VERSION, str(java_major(java_home)), *_BUILD_OPTIONS)).encode()
    ).hexdigest()[:16]
    return cache_root() / "keycloak-augmented" / f"{KEYCLOAK_VERSION}-{key}"


def _save_augmentation(quarkus_dir: Path, target: Path) -> None:
    """Keep a started instance's ``lib/quarkus`` for the next instances (atomic: copy, rename)."""
    scratch = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        shutil.copytree(quarkus_dir, scratch)
        scratch.rename(target)
        logger.info("kept Keycloak's augmented build in %s", target)
    except OSError as exc:  # another session got there first, or the cache is read-only
        logger.debug("not keeping Keycloak's augmented build: %s", exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_JAVA_WRAPPER = "java-dies-with-parent"
_JAVA_WRAPPER_SOURCE = """\
#!{python} -IS
# Written by otterscale.testing: run the JVM with the Linux parent-death signal set, so it dies
# with kc.sh (which itself dies with the test run).
import ctypes, os, signal, sys

JAVA = {java!r}
if sys.platform.startswith("linux"):
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(1)
os.execv(JAVA, [JAVA, *sys.argv[1:]])
"""


def _prepare_home(dist: Path, home: Path, augmented: Path | None, java_home: Path) -> None:
    """A private Keycloak home: scripts, config, build output and data copied, jars symlinked."""
    if home.exists():
        shutil.rmtree(home)
    (home / "lib").mkdir(parents=True)
    # kc.sh finds its home through its own resolved path, so it must be a copy, not a link.
    (home / "bin").mkdir()
    shutil.copy2(dist / "bin" / "kc.sh", home / "bin" / "kc.sh")
    wrapper = home / "bin" / _JAVA_WRAPPER
    wrapper.write_text(
        _JAVA_WRAPPER_SOURCE.format(python=sys.executable, java=str(java_home / "bin" / "java"))
    )
    wrapper.chmod(0o755)
    shutil.copytree(dist / "conf", home / "conf", symlinks=True)
    for name in ("providers", "themes"):
        (home / name).mkdir()
    shutil.copy2(dist / "version.txt", home / "version.txt")
    (home / "lib" / "lib").symlink_to(dist / "lib" / "lib", target_is_directory=True)
    (home / "lib" / "app").symlink_to(dist / "lib" / "app", target_is_directory=True)
    shutil.copy2(dist / "lib" / "quarkus-run.jar", home / "lib" / "quarkus-run.jar")
    shutil.copytree(augmented or dist / "lib" / "quarkus", home / "lib" / "quarkus")
    (home / "data" / "import").mkdir(parents=True)


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")}
    env.setdefault("PATH", "/usr/bin:/bin")
    env.update(extra)
    return env


def _group_rss(pgid: int) -> int:
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:  # field 5 (pgrp), counted after "state" and "ppid"
                total += int((entry / "statm").read_text().split()[1]) * page
    return total


# --- HTTP (stdlib, so fixtures need no HTTP library) -----------------------------------------------


class _HTTPStatusError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _post_form(url: str, form: Mapping[str, str]) -> dict[str, Any]:
    req = urllib.request.Request(  # noqa: S310 - loopback http
        url,
        data=urllib.parse.urlencode(form).encode(),
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        raise _HTTPStatusError(exc.code, parsed) from None
    except (urllib.error.URLError, OSError) as exc:
        raise KeycloakError(f"cannot reach Keycloak at {_origin(url)}: {exc}") from None
    if not isinstance(body, dict):
        raise KeycloakError(f"{_origin(url)} answered with JSON that is not an object")
    return body


def _request(
    method: str, url: str, bearer: str, *, json_body: Any = None
) -> tuple[int, Mapping[str, str], Any]:
    data = json.dumps(json_body).encode() if json_body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback http
    req.add_header("Authorization", f"Bearer {bearer}")
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            raw = resp.read()
            return resp.status, dict(resp.headers), json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise KeycloakError(f"{method} {urllib.parse.urlsplit(url).path}: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise KeycloakError(f"cannot reach Keycloak at {_origin(url)}: {exc}") from None


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
