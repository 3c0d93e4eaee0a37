"""The ``otterscale.yaml`` configuration: models, loading and validation a person can act on.

The file format is the original Go service's, unchanged::

    keycloak:  {realm_url, client_id}
    tunnel:    {server: {host, port, key_seed | key_file}}
    clusters:  {<name>: {agent: {auth: {user, pass}, fingerprint, tunnel_port, api_port}}}

Ports may be integers or quoted strings (``"8300"``). New, optional keys (all under ``keycloak``):
``audience`` (default: ``client_id``), ``subject_claim`` (``sub``), ``subject_prefix`` (empty),
``groups_claim`` (``groups``), ``groups_prefix`` (empty), ``require_access_token`` (true),
``authorized_parties`` (empty: any client), ``leeway_seconds`` (30), ``timeout_seconds`` (5) and
``min_refresh_interval_seconds`` (30). The optional ``limits`` section bounds what the hub
accepts from and holds for clients (:class:`HubLimitsConfig`; agents ignore it); the optional
``audit`` section says where audit events go (:class:`AuditConfig`); the optional ``cors``
section lets browser pages of other origins call the hub (:class:`CorsConfig`; agents ignore it);
the optional ``runtime`` section bounds the agents' exec and port-forward sessions
(:class:`RuntimeConfig`; the hub ignores it). Hub-only additions for fan-out calls:
``clusters.<name>.labels``, the ``fanout`` section (:class:`FanoutConfig`) and the ``access``
section (:class:`AccessConfig`, per-caller cluster allow-lists). Unknown keys are refused
everywhere: a typo must not silently fall back to a default.

Secrets (``tunnel.server.key_seed``, ``clusters.<name>.agent.auth.pass``) must be at least
``MIN_SECRET_LENGTH`` (32) characters and not one of the documentation's example values: the
seed is the hub's SSH identity and each password is also the key that signs identity headers.

Every problem in a file is reported at once, one line each, naming the file and the dotted key
path (``clusters.dev.agent.tunnel_port``). Messages are built here from error locations and
types, never from pydantic's rendering, so a password or key seed is never echoed; ``repr`` of
the models masks them too (``SecretStr``).

YAML limits (the file is trusted, but mistakes and hostile copies should fail cleanly): at most
``MAX_CONFIG_BYTES`` (1 MiB) of UTF-8, one document, ``safe_load`` semantics (no Python tags),
no duplicate keys, and aliases allowed only while the document expanded through them stays under
``MAX_YAML_NODES`` (100,000) nodes and ``MAX_YAML_DEPTH`` (50) levels, so alias bombs
("billion laughs") and recursive aliases are refused before any value is built.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ._envoy import LIMIT_BOUNDS, ListenerLimits
from ._errors import ConfigError
from ._identity import identity_name_problem
from ._labels import LabelSelector, LabelSyntaxError, label_key_problem, label_value_problem

logger = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 1024 * 1024
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 50

#: Shortest ``tunnel.server.key_seed`` and agent ``auth.pass`` accepted, in characters.
MIN_SECRET_LENGTH = 32
#: How to make a good one (in every refusal).
GENERATE_HINT = "`openssl rand -base64 32`"
#: Values the README, the charts and earlier documentation show as examples: refused as secrets.
EXAMPLE_SECRETS = frozenset(
    {
        "a-long-random-secret",
        "a-long-random-password",
        "change-me",
        "changeme",
        "dev-agent-password",
        "REPLACE-WITH-THE-OUTPUT-OF-openssl-rand-base64-32",
    }
)

_CLUSTER_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT_TEXT_RE = re.compile(r"[0-9]{1,5}")
_SECRET_KEYS = frozenset({"pass", "password", "key_seed", "token_key", "previous_token_keys"})
# parse_config runs the cross-field checks on the raw document (so they are reported together with
# every other problem) and tells the models, through the validation context, not to repeat them.
_CHECKED_CONTEXT_KEY = "otterscale.cross_checked"


# --------------------------------------------------------------------------------------------------
# Field types


def _port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        port = value
    elif isinstance(value, str) and _PORT_TEXT_RE.fullmatch(value.strip()):
        port = int(value.strip())
    else:
        raise PydanticCustomError(
            "otterscale_port_type", 'must be a port number: an integer or a quoted integer such as "8300"'
        )
    if not 1 <= port <= 65535:
        raise PydanticCustomError(
            "otterscale_port_range", "must be a port number between 1 and 65535, got {port}", {"port": port}
        )
    return port


def _non_empty(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("otterscale_empty", "must not be empty")
    return value


def _non_empty_path(value: Path) -> Path:
    if str(value) in ("", "."):
        raise PydanticCustomError("otterscale_empty", "must be a file path")
    return value


def _cluster_name(value: str) -> str:
    if not _CLUSTER_NAME_RE.fullmatch(value):
        raise PydanticCustomError(
            "otterscale_cluster_name",
            "cluster name must be a DNS label (lower-case letters, digits and '-', starting and ending "
            "with a letter or digit, at most 63 characters) because it appears in URLs, tunnel rules "
            "and Kubernetes names",
        )
    return value


def _agent_user(value: str) -> str:
    _non_empty(value)
    if ":" in value or any(char.isspace() or not char.isprintable() for char in value):
        raise PydanticCustomError(
            "otterscale_agent_user", "must not contain ':', spaces or control characters (tunnel user name)"
        )
    return value


def _realm_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PydanticCustomError(
            "otterscale_url", "must be an http(s) URL such as https://keycloak.example.com/realms/otterscale"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise PydanticCustomError(
            "otterscale_url", "must be a plain issuer URL without user info, query or fragment"
        )
    return value


def _name_prefix(value: str) -> str:
    """``subject_prefix`` / ``groups_prefix``: empty, or a valid start of a name (the identity rule)."""
    if value:
        problem = identity_name_problem(value, "the prefix")
        if problem:
            raise PydanticCustomError("otterscale_prefix", problem.removeprefix("the prefix "))
    return value


def _strong_secret(value: SecretStr) -> SecretStr:
    """``key_seed``, ``pass``, ``token_key``: long enough to resist guessing, not a documented example."""
    secret = value.get_secret_value()
    if not secret:
        raise PydanticCustomError("otterscale_empty", "must not be empty")
    if secret.strip() in EXAMPLE_SECRETS:
        raise PydanticCustomError(
            "otterscale_weak_secret",
            f"is an example value from the documentation; generate a secret: {GENERATE_HINT}",
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise PydanticCustomError(
            "otterscale_weak_secret",
            f"is shorter than {MIN_SECRET_LENGTH} characters; generate a secret: {GENERATE_HINT}",
        )
    return value


def _authorized_parties(value: object) -> object:
    # One client id on its own is a common way to write a one-item list.
    return [value] if isinstance(value, str) else value


def _reads_level(value: object) -> object:
    # YAML 1.1 reads an unquoted `off` as false.
    return "off" if value is False else value


_HOST_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN_HINT = "scheme://host[:port] such as https://dashboard.example.com or https://*.example.com"


def _cors_origin(value: str) -> str:
    """An allowed origin in its canonical form (how browsers send ``Origin``), or ``*``.

    Lower-case scheme and host, no default port, no path; ``https://*.example.com`` allows one
    label in place of ``*`` (``a.example.com``, not ``a.b.example.com`` nor ``example.com``).
    """
    text = value.strip()
    if text == "*":
        return text
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise PydanticCustomError("otterscale_origin", "must be an http(s) origin: " + _ORIGIN_HINT)
    authority, slash, path = rest.partition("/")
    if slash and path:
        raise PydanticCustomError(
            "otterscale_origin", "an origin has no path, query or fragment: " + _ORIGIN_HINT
        )
    if slash:
        raise PydanticCustomError(
            "otterscale_origin", "an origin has no trailing '/' (browsers send it without one)"
        )
    if any(char in authority for char in "?#@") or any(char.isspace() for char in authority):
        raise PydanticCustomError(
            "otterscale_origin", "an origin has no user info, query or fragment: " + _ORIGIN_HINT
        )
    if not authority.isascii():
        raise PydanticCustomError(
            "otterscale_origin", "write an internationalised host name in its ASCII (xn--) form"
        )
    host, port = _split_authority(authority.lower())
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if "*" in name:
        raise PydanticCustomError(
            "otterscale_origin", "'*' may only stand for the first label, as in https://*.example.com"
        )
    if not _valid_host(name, allow_ip=not wildcard):
        raise PydanticCustomError("otterscale_origin", "has an invalid host: " + _ORIGIN_HINT)
    if wildcard and "." not in name and name != "localhost":
        raise PydanticCustomError(
            "otterscale_origin", "a wildcard needs a domain of at least two labels, as in *.example.com"
        )
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def _split_authority(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):  # an IPv6 literal
        end = authority.find("]")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise PydanticCustomError("otterscale_origin", "has an invalid IPv6 host: " + _ORIGIN_HINT)
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_or_empty = authority.partition(":")
        port_text = port_text_or_empty if colon else None
    if port_text is None:
        return host, None
    if not _PORT_TEXT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise PydanticCustomError("otterscale_origin", "has an invalid port: " + _ORIGIN_HINT)
    return host, int(port_text)


def _valid_host(host: str, *, allow_ip: bool) -> bool:
    if host.startswith("["):
        if not allow_ip:
            return False
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    labels = host.split(".")
    return len(host) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _header_name(value: str) -> str:
    name = value.strip().lower()
    if not _HEADER_NAME_RE.fullmatch(name):
        raise PydanticCustomError(
            "otterscale_header_name", "must be an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
        )
    return name


Port = Annotated[int, PlainValidator(_port)]
NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]
ClusterName = Annotated[str, AfterValidator(_cluster_name)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)


# --------------------------------------------------------------------------------------------------
# Models


class KeycloakConfig(_Model):
    """How the hub verifies bearer tokens: the OIDC issuer (a Keycloak realm) and the audience."""

    realm_url: Annotated[str, AfterValidator(_realm_url)]
    client_id: NonEmptyStr
    audience: NonEmptyStr | None = None
    subject_claim: NonEmptyStr = "sub"
    subject_prefix: Annotated[str, AfterValidator(_name_prefix)] = ""
    groups_claim: NonEmptyStr = "groups"
    groups_prefix: Annotated[str, AfterValidator(_name_prefix)] = ""
    require_access_token: bool = Field(default=True, strict=True)
    authorized_parties: Annotated[tuple[NonEmptyStr, ...], BeforeValidator(_authorized_parties)] = ()
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    min_refresh_interval_seconds: float = Field(default=30.0, ge=0, le=3600)

    @property
    def expected_audience(self) -> str:
        """The ``aud`` a token must carry: ``audience`` when set, else ``client_id``."""
        return self.audience if self.audience is not None else self.client_id


class TunnelServerConfig(_Model):
    """Where the hub's embedded tunnel server binds, and its private key (seed or key file).

    ``key_file`` is used as written: a relative path is relative to the working directory, as in
    the original service.
    """

    host: NonEmptyStr
    port: Port
    key_seed: Annotated[SecretStr, AfterValidator(_strong_secret)] | None = None
    key_file: Annotated[Path, AfterValidator(_non_empty_path)] | None = None

    @model_validator(mode="after")
    def _one_key_source(self, info: ValidationInfo) -> Self:
        if not _already_checked(info) and self.key_seed is not None and self.key_file is not None:
            raise PydanticCustomError("otterscale_key_source", _BOTH_KEYS)
        return self


class TunnelConfig(_Model):
    """The ``tunnel`` section: only the server side lives here."""

    server: TunnelServerConfig


class AgentAuth(_Model):
    """The credentials an agent uses to open its reverse tunnel (YAML keys ``user`` and ``pass``)."""

    user: Annotated[str, AfterValidator(_agent_user)]
    password: Annotated[SecretStr, AfterValidator(_strong_secret)] = Field(alias="pass")


class AgentConfig(_Model):
    """One cluster's agent: tunnel credentials, the expected server fingerprint, and its ports.

    ``fingerprint`` is optional here because the server prints it only on its first start; the
    agent must refuse to connect without one.
    """

    auth: AgentAuth
    fingerprint: NonEmptyStr | None = None
    tunnel_port: Port
    api_port: Port


def _label_key(value: str) -> str:
    problem = label_key_problem(value)
    if problem:
        raise PydanticCustomError("otterscale_label_key", problem)
    return value


def _label_value(value: str) -> str:
    problem = label_value_problem(value)
    if problem:
        raise PydanticCustomError("otterscale_label_value", problem)
    return value


def _selector(value: str) -> str:
    try:
        LabelSelector.parse(value)
    except LabelSyntaxError as exc:
        raise PydanticCustomError(
            "otterscale_selector", "not a label selector: {reason}", {"reason": str(exc)}
        ) from None
    return value


LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelValue = Annotated[str, Field(strict=True), AfterValidator(_label_value)]
Selector = Annotated[str, AfterValidator(_selector)]


class ClusterConfig(_Model):
    """One entry of ``clusters``.

    ``labels`` (optional, a hub-only addition) are Kubernetes-style labels of the cluster, for
    fan-out calls and ``access`` rules that select clusters by label (``env: prod``).
    """

    agent: AgentConfig
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64)


_MIB = 1024 * 1024


class HubLimitsConfig(_Model):
    """The ``limits`` section: what the hub accepts from, and holds for, its clients (optional).

    Every refusal is a Connect ``resource_exhausted`` whose message names the limit and this key,
    and is counted in ``otterscale_hub_limit_refusals_total`` by reason.

    ``max_request_bytes`` (default 4 MiB): the largest request body (a Create or Apply carrying a
    manifest; the agent's own manifest limit is 3 MiB, so anything the agent could accept fits).
    Refused before the body is read when ``Content-Length`` says so, else as soon as that many
    bytes have arrived: the hub never buffers more.

    ``max_response_bytes`` (default 64 MiB): the largest unary answer from an agent (a List of
    5,000 1-KiB ConfigMaps is about 5.4 MB). Reading stops there and the call ends with a hint to
    page with limit/continue, so one call never holds more than about this much in the hub.

    ``max_watches_per_subject`` (default 1000): concurrent Watch streams one authenticated subject
    may hold on this hub; a stream that ends for any reason frees its slot.

    ``watch_send_timeout_seconds`` (default 30): a Watch whose client has not accepted an event for
    this long (it stopped reading; HTTP/2 flow control holds the rest) is ended and its upstream
    stream, slot and gauge released.

    Enforced by Envoy, in front of the hub (and, for the first key, the agent too; the agent takes
    the others' defaults): ``request_timeout_seconds`` (default 10): a request's headers and its
    whole unary body must have arrived within this many seconds; ``max_connections`` (default
    4096) open connections at most; ``max_streams_per_connection`` (default 1000) concurrent
    HTTP/2 streams; ``peer_requests_per_second`` (default 0, no limit) new requests per second per
    peer address, bursts of twice that.

    Enforced by the hub in front of authentication: ``max_requests_per_peer`` (default 2000, 0 for
    no limit) calls one caller address may have in progress on the hub at once, unary calls and
    open streams alike (Envoy has no per-address bound; this bounds what one address can make the
    hub hold).
    """

    # Strict: YAML's true/false or 1.5 must not quietly become a byte count.
    max_request_bytes: int = Field(default=4 * _MIB, ge=1024, le=1024 * _MIB, strict=True)
    max_response_bytes: int = Field(default=64 * _MIB, ge=64 * 1024, le=4096 * _MIB, strict=True)
    max_watches_per_subject: int = Field(default=1000, ge=1, le=1_000_000, strict=True)
    watch_send_timeout_seconds: float = Field(default=30.0, gt=0, le=86_400)
    request_timeout_seconds: float = Field(
        default=10.0,
        ge=LIMIT_BOUNDS["request_timeout_seconds"][0],
        le=LIMIT_BOUNDS["request_timeout_seconds"][1],
        strict=True,
    )
    max_connections: int = Field(
        default=4096,
        ge=LIMIT_BOUNDS["max_connections"][0],
        le=LIMIT_BOUNDS["max_connections"][1],
        strict=True,
    )
    max_streams_per_connection: int = Field(
        default=1000,
        ge=LIMIT_BOUNDS["max_streams_per_connection"][0],
        le=LIMIT_BOUNDS["max_streams_per_connection"][1],
        strict=True,
    )
    peer_requests_per_second: int = Field(
        default=0,
        ge=LIMIT_BOUNDS["peer_requests_per_second"][0],
        le=LIMIT_BOUNDS["peer_requests_per_second"][1],
        strict=True,
    )
    max_requests_per_peer: int = Field(default=2000, ge=0, le=1_000_000, strict=True)


def listener_limits(limits: HubLimitsConfig, *, hub: bool) -> ListenerLimits:
    """What Envoy enforces for the hub (``hub``) or an agent, from the validated ``limits``.

    The agent's one client is the hub (through chisel): it takes only the request deadline.
    """
    if not hub:
        return ListenerLimits(request_timeout=limits.request_timeout_seconds)
    return ListenerLimits(
        request_timeout=limits.request_timeout_seconds,
        max_connections=limits.max_connections,
        max_streams_per_connection=limits.max_streams_per_connection,
        peer_requests_per_second=limits.peer_requests_per_second,
    )


class RuntimeConfig(_Model):
    """The ``runtime`` section: the agents' exec and port-forward sessions (optional; the hub
    ignores it).

    A session belongs to the subject that started it; the per-subject and per-agent limits count
    open sessions, so a refused start succeeds again once one ends. ``idle_timeout_seconds``
    ends a session with no input, output or resize for that long; ``max_lifetime_seconds`` ends
    any session that old. ``heartbeat_seconds`` is how often an idle PodLog, ExecuteTTY or
    PortForward stream carries an empty message (so proxies in between keep it open).
    ``max_write_bytes`` bounds one WriteTTY/WritePortForward payload, ``max_pending_bytes`` the
    input one session holds (writes waiting for their turn or for a gap to fill), and
    ``write_gap_timeout_seconds`` how long a write after a gap waits for the missing bytes.
    ``audit_argv`` says how much of an exec command goes into the audit record: ``full``,
    ``command`` (argv[0] only) or ``none``.
    """

    max_exec_sessions_per_subject: int = Field(default=10, ge=1, le=10_000, strict=True)
    max_port_forward_sessions_per_subject: int = Field(default=10, ge=1, le=10_000, strict=True)
    max_exec_sessions: int = Field(default=100, ge=1, le=100_000, strict=True)
    max_port_forward_sessions: int = Field(default=100, ge=1, le=100_000, strict=True)
    idle_timeout_seconds: float = Field(default=1800.0, gt=0, le=7 * 86_400)
    max_lifetime_seconds: float = Field(default=8 * 3600.0, gt=0, le=30 * 86_400)
    heartbeat_seconds: float = Field(default=30.0, gt=0, le=3600)
    max_write_bytes: int = Field(default=64 * 1024, ge=1024, le=4 * _MIB, strict=True)
    max_pending_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * _MIB, strict=True)
    write_gap_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    audit_argv: typing.Literal["full", "command", "none"] = "full"


class AuditConfig(_Model):
    """The ``audit`` section: where audit events go and which calls produce one (optional).

    ``sink``: ``stdout`` (default; the services' own logs go to stderr, so the two streams stay
    apart) or ``file``, which appends to ``file`` and rotates it at ``max_bytes`` (default 100 MiB),
    keeping ``backups`` (default 5) older files. ``reads``: ``off`` (default) or ``metadata``, which
    audits reads (Get, Describe, List, Watch, Discovery, Schema, ListClusters) too. Calls that change
    something are always audited. See :mod:`otterscale.common._audit` for the events.
    """

    sink: Literal["stdout", "file"] = "stdout"
    file: Annotated[Path, AfterValidator(_non_empty_path)] | None = None
    max_bytes: int = Field(default=100 * _MIB, ge=64 * 1024, le=1024 * 1024 * _MIB, strict=True)
    backups: int = Field(default=5, ge=1, le=1000, strict=True)
    reads: Annotated[Literal["off", "metadata"], BeforeValidator(_reads_level)] = "off"

    @model_validator(mode="after")
    def _file_with_file_sink(self) -> Self:
        if self.sink == "file" and self.file is None:
            raise PydanticCustomError("otterscale_audit_file", "sink: file needs file: PATH")
        if self.sink != "file" and self.file is not None:
            raise PydanticCustomError("otterscale_audit_file", "file is used only with sink: file")
        return self


class CorsConfig(_Model):
    """The ``cors`` section: which browser origins may call the hub from their pages (optional).

    ``allowed_origins``: exact origins (``https://dashboard.example.com``, ``http://127.0.0.1:5173``;
    the host is compared case-insensitively and a default port is dropped), one-level wildcards
    (``https://*.example.com``), or ``*`` (any origin; only while ``allow_credentials`` is false).
    Empty (the default): same-origin only, the hub sends no CORS headers at all.

    ``allow_credentials`` (default false): answer ``Access-Control-Allow-Credentials: true``.
    Bearer tokens set by a script do not need it; only cookies would.

    ``extra_allowed_headers``: request headers a page may send besides Connect's and gRPC-Web's
    own, ``Authorization`` and ``X-Request-Id``.

    CORS is not access control (the bearer token is): it only tells browsers which pages may
    read the hub's answers.
    """

    allowed_origins: tuple[Annotated[str, AfterValidator(_cors_origin)], ...] = ()
    allow_credentials: bool = Field(default=False, strict=True)
    extra_allowed_headers: tuple[Annotated[str, AfterValidator(_header_name)], ...] = ()

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> Self:
        if self.allow_credentials and "*" in self.allowed_origins:
            raise PydanticCustomError(
                "otterscale_cors_star",
                "'*' (any origin) is refused while allow_credentials is true: list the origins",
            )
        return self


#: A fan-out token key: as strong as every other secret in the file.
TokenKey = Annotated[SecretStr, AfterValidator(_strong_secret)]


class FanoutConfig(_Model):
    """The ``fanout`` section: MultiClusterService (MultiList, MultiWatch) limits and keys (optional).

    ``token_key``: the secret that encrypts and authenticates MultiList cursors and MultiWatch
    resume tokens. Every hub replica must have the same one (a cursor issued by one leader is
    used on the next); absent, it is derived from the tunnel server's key (seed or key file), which
    replicas already share. ``previous_token_keys``: keys still accepted (never used for new
    tokens) while a new ``token_key`` rolls out.

    Limits (each refusal is resource_exhausted naming its key): ``max_clusters_per_call`` (a
    selection resolving to more is invalid_argument), ``max_legs_per_subject`` (List legs in flight
    plus open Watch legs of one authenticated subject), ``max_inflight_per_cluster`` (List legs in
    flight to one cluster, all callers together; more wait their turn, served round-robin by
    subject), ``max_inflight_legs`` (List legs in flight in this hub, all callers together; more
    wait), ``max_concurrency`` (the most a caller may ask for in ``max_concurrency``),
    ``max_watch_legs`` (Watch legs open in this hub, all callers together).

    Defaults of calls: ``per_cluster_timeout_seconds`` (a leg's timeout when the call names none),
    ``default_page_items`` / ``max_page_items`` (MultiList page sizes), ``cursor_ttl_seconds``
    (how long a MultiList cursor is accepted; Kubernetes continue tokens expire too).
    """

    token_key: TokenKey | None = None
    previous_token_keys: list[TokenKey] = Field(default_factory=list, max_length=4)
    max_clusters_per_call: int = Field(default=1000, ge=1, le=100_000, strict=True)
    max_legs_per_subject: int = Field(default=2000, ge=1, le=1_000_000, strict=True)
    max_inflight_per_cluster: int = Field(default=8, ge=1, le=10_000, strict=True)
    max_inflight_legs: int = Field(default=256, ge=1, le=1_000_000, strict=True)
    max_concurrency: int = Field(default=128, ge=1, le=10_000, strict=True)
    max_watch_legs: int = Field(default=20_000, ge=1, le=10_000_000, strict=True)
    per_cluster_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    default_page_items: int = Field(default=500, ge=1, le=1_000_000, strict=True)
    max_page_items: int = Field(default=100_000, ge=1, le=10_000_000, strict=True)
    cursor_ttl_seconds: float = Field(default=600.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _page_sizes(self) -> Self:
        if self.default_page_items > self.max_page_items:
            raise PydanticCustomError(
                "otterscale_page_items", "default_page_items must not be larger than max_page_items"
            )
        return self


def _glob(value: str) -> str:
    if not value or not re.fullmatch(r"[a-z0-9*?\[\]!-]{1,63}", value):
        raise PydanticCustomError(
            "otterscale_cluster_glob",
            "must be a cluster name or a glob of one (lower-case letters, digits, '-', and * ? [...])",
        )
    return value


ClusterGlob = Annotated[str, AfterValidator(_glob)]


class AccessRule(_Model):
    """One ``access.rules`` entry: callers (``groups`` or ``subjects``) and the clusters they may use
    (``clusters``: names or globs such as ``dev-*``; ``cluster_labels``: a label selector over
    ``clusters.<name>.labels``; a cluster matching either is allowed)."""

    groups: list[NonEmptyStr] = Field(default_factory=list, max_length=1000)
    subjects: list[NonEmptyStr] = Field(default_factory=list, max_length=1000)
    clusters: list[ClusterGlob] = Field(default_factory=list, max_length=10_000)
    cluster_labels: Selector | None = None

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if not self.groups and not self.subjects:
            raise PydanticCustomError("otterscale_access_rule", "a rule needs groups or subjects (who)")
        if not self.clusters and self.cluster_labels is None:
            raise PydanticCustomError(
                "otterscale_access_rule", "a rule needs clusters or cluster_labels (which clusters)"
            )
        return self


class AccessConfig(_Model):
    """The ``access`` section: which clusters each caller may use through the hub (optional).

    Allow-lists restrict, they never grant: a caller allowed on a cluster still needs that
    cluster's RBAC. A caller matched by one or more ``rules`` (by subject, or by one of its groups
    as the token carries them, after ``keycloak.groups_prefix``) may use the clusters of those
    rules; a caller matched by none may use every cluster when ``default`` is ``all`` (the
    default) and none when it is ``none``. A cluster a caller may not use looks exactly like one
    that does not exist.
    """

    default: typing.Literal["all", "none"] = "all"
    rules: list[AccessRule] = Field(default_factory=list, max_length=10_000)


class OtterscaleConfig(_Model):
    """The whole ``otterscale.yaml``. Build it with :func:`load_config` (or :func:`parse_config`)."""

    keycloak: KeycloakConfig
    tunnel: TunnelConfig
    clusters: dict[ClusterName, ClusterConfig]
    limits: HubLimitsConfig = HubLimitsConfig()
    audit: AuditConfig = AuditConfig()
    cors: CorsConfig = CorsConfig()
    fanout: FanoutConfig = FanoutConfig()
    access: AccessConfig | None = None
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _unique_ports_and_users(self, info: ValidationInfo) -> Self:
        if _already_checked(info):
            return self
        entries = [
            (name, cluster.agent.tunnel_port, cluster.agent.auth.user)
            for name, cluster in self.clusters.items()
        ]
        problems = _cluster_clashes(entries, self.tunnel.server.port)
        if problems:
            message = "; ".join(f"{path}: {reason}" for path, reason in problems)
            raise PydanticCustomError("otterscale_clash", message)
        return self


def _already_checked(info: ValidationInfo) -> bool:
    return isinstance(info.context, Mapping) and bool(info.context.get(_CHECKED_CONTEXT_KEY))


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str], *, require_tunnel_key: bool = True) -> OtterscaleConfig:
    """Read and validate ``otterscale.yaml``; raise :class:`ConfigError` listing every problem.

    ``require_tunnel_key`` (the server) demands exactly one of ``tunnel.server.key_seed`` and
    ``key_file`` and checks that the key file can be read. The agent passes False: it never needs
    the server's private key and should not be given it.
    """
    file = Path(path)
    source = str(file)
    try:
        with file.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(source, [("", "configuration file not found (pass --config=PATH)")]) from None
    except IsADirectoryError:
        raise ConfigError(source, [("", "is a directory, not a configuration file")]) from None
    except PermissionError:
        raise ConfigError(source, [("", "cannot read the configuration file: permission denied")]) from None
    except OSError as exc:
        raise ConfigError(
            source, [("", f"cannot read the configuration file: {exc.strerror or exc}")]
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(source, [("", f"file is larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [("", f"not UTF-8 text (invalid byte at offset {exc.start})")]) from None
    return parse_config(text, source, require_tunnel_key=require_tunnel_key)


def parse_config(text: str, source: str, *, require_tunnel_key: bool = True) -> OtterscaleConfig:
    """Validate configuration ``text``; ``source`` names it in error messages (usually the path).

    See :func:`load_config` for ``require_tunnel_key``.
    """
    if len(text.encode("utf-8", errors="surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(source, [("", f"configuration is larger than {MAX_CONFIG_BYTES} bytes")])
    document = _load_yaml(text, source)
    if document is None:
        raise ConfigError(
            source, [("", "configuration is empty; expected keys keycloak, tunnel and clusters")]
        )
    if not isinstance(document, dict):
        reason = (
            f"the document must be a mapping with keys keycloak, tunnel and clusters, not {_kind(document)}"
        )
        raise ConfigError(source, [("", reason)])

    problems = _cross_checks(document, require_tunnel_key=require_tunnel_key)
    config: OtterscaleConfig | None = None
    try:
        config = OtterscaleConfig.model_validate(
            document, by_alias=True, by_name=False, context={_CHECKED_CONTEXT_KEY: True}
        )
    except ValidationError as exc:
        problems = _validation_problems(exc) + problems
    if problems or config is None:
        raise ConfigError(source, _dedupe(problems))
    logger.debug("loaded configuration from %s (%d clusters)", source, len(config.clusters))
    return config


# --------------------------------------------------------------------------------------------------
# Cross-field checks, run on the raw document so they are reported with every other problem

_BOTH_KEYS = "give exactly one of key_seed or key_file, not both"
_NO_KEY = "needs key_seed or key_file (the tunnel server's private key); the server cannot start without one"


def _cross_checks(document: Mapping[Any, Any], *, require_tunnel_key: bool) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    server = _get(document, "tunnel", "server")
    server_port: int | None = None
    if isinstance(server, Mapping):
        server_port = _lenient_port(server.get("port"))
        has_seed = server.get("key_seed") is not None
        has_file = server.get("key_file") is not None
        if has_seed and has_file:
            problems.append(("tunnel.server", _BOTH_KEYS))
        elif require_tunnel_key and not has_seed and not has_file:
            problems.append(("tunnel.server", _NO_KEY))
        elif require_tunnel_key and has_file and isinstance(server["key_file"], str) and server["key_file"]:
            reason = _unreadable(Path(server["key_file"]))
            if reason:
                problems.append(("tunnel.server.key_file", reason))

    clusters = document.get("clusters")
    if isinstance(clusters, Mapping):
        entries: list[tuple[str, int | None, str | None]] = []
        for name, cluster in clusters.items():
            if not isinstance(name, str):
                problems.append(
                    (
                        f"clusters.{name}",
                        f"cluster name must be a string, not {_kind(name)}; quote it "
                        "(YAML reads on, off, yes, no and numbers as other types)",
                    )
                )
            port = _lenient_port(_get(cluster, "agent", "tunnel_port"))
            user = _get(cluster, "agent", "auth", "user")
            entries.append((str(name), port, user if isinstance(user, str) else None))
        problems.extend(_cluster_clashes(entries, server_port))
        problems.extend(_access_clusters(document.get("access"), {str(name) for name in clusters}))
    return problems


def _access_clusters(access: object, names: set[str]) -> list[tuple[str, str]]:
    """A rule naming (without a glob) a cluster that is not configured is a typo, not a policy."""
    problems: list[tuple[str, str]] = []
    rules = _get(access, "rules")
    if not isinstance(rules, list):
        return problems
    for i, rule in enumerate(rules):
        listed = _get(rule, "clusters")
        if not isinstance(listed, list):
            continue
        for j, name in enumerate(listed):
            if isinstance(name, str) and not any(c in name for c in "*?[") and name not in names:
                problems.append((f"access.rules.{i}.clusters.{j}", f"cluster {name!r} is not configured"))
    return problems


def _cluster_clashes(
    entries: Sequence[tuple[str, int | None, str | None]], server_port: int | None
) -> list[tuple[str, str]]:
    """Two clusters may share neither a hub-side tunnel port nor a tunnel user."""
    problems: list[tuple[str, str]] = []
    port_owner: dict[int, str] = {}
    user_owner: dict[str, str] = {}
    for name, port, user in entries:
        if port is not None:
            if port == server_port:
                problems.append(
                    (
                        f"clusters.{name}.agent.tunnel_port",
                        f"port {port} is also tunnel.server.port; pick another",
                    )
                )
            elif port in port_owner:
                problems.append(
                    (
                        f"clusters.{name}.agent.tunnel_port",
                        f"port {port} is also the tunnel_port of cluster {port_owner[port]!r}; "
                        "each cluster needs its own",
                    )
                )
            else:
                port_owner[port] = name
        if user is not None:
            if user in user_owner:
                problems.append(
                    (
                        f"clusters.{name}.agent.auth.user",
                        f"user {user!r} is also the agent user of cluster {user_owner[user]!r}; "
                        "each cluster needs its own",
                    )
                )
            else:
                user_owner[user] = name
    return problems


def _unreadable(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        return f"key file {path} does not exist"
    except IsADirectoryError:
        return f"key file {path} is a directory"
    except PermissionError:
        return f"key file {path} is not readable (permission denied)"
    except OSError as exc:
        return f"key file {path} cannot be read: {exc.strerror or type(exc).__name__}"
    return None


def _get(value: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _lenient_port(value: object) -> int | None:
    try:
        return _port(value)
    except PydanticCustomError:
        return None


# --------------------------------------------------------------------------------------------------
# Turning pydantic errors into messages that never echo a value

_TYPE_MESSAGES = {
    "missing": "is required",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "string_type": "must be a string (quote the value in YAML)",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "path_type": "must be a file path",
}


def _validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(error["loc"])
        error_type = error["type"]
        if loc[-1:] == ("[key]",) and error_type == "string_type":
            continue  # a cluster name that YAML read as a bool or number: reported by _cross_checks
        if error_type == "otterscale_clash":  # already a list of "path: reason"
            problems.extend(_split_clash(error["msg"]))
            continue
        path = _dotted(loc)
        if error_type == "extra_forbidden":
            reason = _unknown_key_reason(loc)
        elif error_type.startswith("otterscale_"):
            reason = error["msg"]
        elif error_type in _TYPE_MESSAGES:
            reason = _TYPE_MESSAGES[error_type]
        elif any(part in _SECRET_KEYS for part in loc if isinstance(part, str)):
            reason = "has an invalid value"
        else:
            reason = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        problems.append((path, reason))
    return problems


def _split_clash(message: str) -> list[tuple[str, str]]:
    result = []
    for item in message.split("; "):
        path, _, reason = item.partition(": ")
        result.append((path, reason))
    return result


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "[key]")


def _unknown_key_reason(loc: tuple[int | str, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown key"
    allowed = [field.alias or name for name, field in model.model_fields.items()]
    reason = "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        reason += f" (did you mean {close[0]}?)"
    return f"{reason}; allowed keys: {', '.join(allowed)}"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping found at ``loc`` (skipping dict keys)."""
    annotation: Any = OtterscaleConfig
    parts = list(loc)
    while True:
        annotation = _strip_optional(annotation)
        if typing.get_origin(annotation) is dict:
            if not parts:
                return None
            parts.pop(0)
            annotation = typing.get_args(annotation)[1]
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        if not parts:
            return annotation
        part = parts.pop(0)
        field = next(
            (f for n, f in annotation.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return None
        annotation = field.annotation


def _strip_optional(annotation: Any) -> Any:
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _dedupe(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(problems))


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "a mapping"}
    return names.get(type(value), f"a {type(value).__name__}")


# --------------------------------------------------------------------------------------------------
# YAML


class _ConfigLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys (a second ``dev:`` would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: SafeConstructor reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # SafeConstructor lets Python's own errors out of explicitly tagged scalars (``!!int x``
        # is a ValueError, ``!!bool x`` a KeyError, a 5000-digit integer a ValueError); give
        # them the node's position like any other YAML error.
        try:
            return super().construct_object(node, deep=deep)
        except _CONSTRUCTION_ERRORS:
            raise _construction_error(node) from None


#: What PyYAML's SafeConstructor raises, besides YAMLError, for a value its tag cannot build.
_CONSTRUCTION_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


def _construction_error(node: yaml.Node | None) -> yaml.constructor.ConstructorError:
    if node is None:
        problem = "a tagged collection cannot be built (check its !! tag)"
        return yaml.constructor.ConstructorError(None, None, problem)
    problem = f"cannot build a !!{node.tag.rsplit(':', 1)[-1]} from this value"
    return yaml.constructor.ConstructorError(None, None, problem, node.start_mark)


class _YamlLimitError(Exception):
    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.mark = mark


def _load_yaml(text: str, source: str) -> object:
    loader: _ConfigLoader | None = None
    try:
        loader = _ConfigLoader(text)  # refuses non-printable characters already (ReaderError)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        try:
            return loader.construct_document(node)
        except _CONSTRUCTION_ERRORS:
            # Collections built after their first step (``!!set [1]``) fail here, outside
            # construct_object, where no node is known any more.
            raise _construction_error(None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", _yaml_reason(exc))]) from None
    except _YamlLimitError as exc:
        raise ConfigError(source, [("", f"not accepted as YAML: {_where(exc.mark)}{exc}")]) from None
    except RecursionError:
        raise ConfigError(
            source, [("", f"not accepted as YAML: nested deeper than {MAX_YAML_DEPTH} levels")]
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expansion(root: yaml.Node) -> None:
    """Refuse documents whose alias-expanded size or depth is beyond the limits, or that are recursive."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise _YamlLimitError(f"nested deeper than {MAX_YAML_DEPTH} levels", node.start_mark)
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _YamlLimitError("recursive alias", node.start_mark)
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child, depth + 1)
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                total += size(key_node, depth + 1) + size(value_node, depth + 1)
        if total > MAX_YAML_NODES:
            raise _YamlLimitError(
                f"expands (through aliases) to more than {MAX_YAML_NODES} nodes", node.start_mark
            )
        active.discard(key)
        sizes[key] = total
        return total

    size(root, 0)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    # Only the parser's description and position: its default rendering quotes the offending line,
    # which may hold a password.
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        context = f"{exc.context}: " if exc.context else ""
        return f"not valid YAML: {_where(mark)}{context}{problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        # The character's code point, never the text around it.
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"not valid YAML: character U+{code:04X} at offset {exc.position} is not allowed: {exc.reason}"
    return "not valid YAML"


def _where(mark: yaml.Mark | None) -> str:
    if mark is None:
        return ""
    return f"line {mark.line + 1}, column {mark.column + 1}: "
