"""The public surface of otterscale.common is exactly the intended set of names (as in httpx)."""

from __future__ import annotations

import inspect
import pathlib

import otterscale
import otterscale.common

EXPECTED = {
    "ASGIApp",
    "drain_request",
    # serving inside Envoy: the launcher (stdlib only) and the hosted application
    "serve",
    "Launch",
    "Address",
    "ListenerLimits",
    "LIMIT_BOUNDS",
    "configured_limits",
    "configured_value",
    "listener_limits",
    "host",
    "Hosted",
    "ServeSettings",
    "ClientGone",
    "streaming_methods",
    "refusal",
    "lazy_exports",
    "LogThrottle",
    # configuration
    "OtterscaleConfig",
    "HubLimitsConfig",
    "RuntimeConfig",
    "FanoutConfig",
    "AccessConfig",
    "AccessRule",
    "LabelSelector",
    "LabelSyntaxError",
    "CorsConfig",
    "KeycloakConfig",
    "TunnelConfig",
    "TunnelServerConfig",
    "ClusterConfig",
    "AgentConfig",
    "AgentAuth",
    "load_config",
    "parse_config",
    "MAX_CONFIG_BYTES",
    "MIN_SECRET_LENGTH",
    "AuditConfig",
    # audit trail
    "AuditClusterOutcome",
    "AuditEvent",
    "AuditKind",
    "AuditLog",
    "AuditSession",
    "AuditTarget",
    # errors
    "OtterscaleError",
    "ConfigError",
    "UsageError",
    "AuthenticationError",
    "IdentityHeaderError",
    "IdentityProviderUnavailableError",
    # identity, OIDC, signed headers
    "Identity",
    "RESERVED_PREFIXES",
    "OIDCVerifier",
    "VerifiedToken",
    "ALLOWED_ALGORITHMS",
    "derive_identity_key",
    "derive_key",
    "mac_fields",
    "sign_identity",
    "verify_identity",
    "strip_identity_headers",
    "IDENTITY_HEADER_PREFIX",
    "SUBJECT_HEADER",
    "GROUPS_HEADER",
    "TIMESTAMP_HEADER",
    "SIGNATURE_HEADER",
    # logging
    "configure_logging",
    "echo",
    "LogFormat",
    "RedactingFilter",
    "redact",
    # command line
    "CommandMain",
    "CommonOptions",
    "add_common_arguments",
    "resolve_defaults",
    "container_mode",
    "parse_address",
    "ENTRY_POINT_GROUP",
    "CONTAINER_ENV",
    "CONTAINER_CONFIG",
    "DEFAULT_ADDRESS",
    "DEFAULT_CONFIG",
    # external processes
    "Supervisor",
    "ProcessSpec",
    "ProcessError",
    # chisel tunnel
    "ChiselServer",
    "ChiselClient",
    "ChiselBinary",
    "ChiselServerEvent",
    "ChiselClientEvent",
    "ChiselClientState",
    "ServerEventKind",
    "ClientEventKind",
    "TunnelError",
    "TunnelSession",
    "TunnelUser",
    "MIN_CHISEL_VERSION",
    "LOOPBACK",
    "check_chisel",
    "find_chisel",
    "parse_chisel_version",
    "parse_server_line",
    "parse_client_line",
    "authfile_content",
    "write_authfile",
    "reverse_remote_pattern",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(otterscale.common.__all__) == EXPECTED
    assert len(otterscale.common.__all__) == len(EXPECTED)


def test_every_public_class_and_function_is_documented() -> None:
    for name in otterscale.common.__all__:
        value = getattr(otterscale.common, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__doc__, f"{name} has no docstring"


def test_public_objects_come_from_private_modules() -> None:
    for name in ("OIDCVerifier", "Identity", "load_config", "sign_identity", "configure_logging"):
        module = getattr(otterscale.common, name).__module__
        assert module.startswith("otterscale.common._"), (name, module)


def test_otterscale_is_an_implicit_namespace_package() -> None:
    assert getattr(otterscale, "__file__", None) is None
    src = pathlib.Path(otterscale.common.__file__).parent.parent
    assert not (src / "__init__.py").exists()


def test_connect_codes_of_the_error_tree() -> None:
    codes = {
        name: getattr(otterscale.common, name).connect_code
        for name in (
            "ConfigError",
            "UsageError",
            "AuthenticationError",
            "IdentityHeaderError",
            "IdentityProviderUnavailableError",
            "ProcessError",
            "TunnelError",
        )
    }
    assert codes == {
        "ConfigError": "failed_precondition",
        "UsageError": "invalid_argument",
        "AuthenticationError": "unauthenticated",
        "IdentityHeaderError": "unauthenticated",
        "IdentityProviderUnavailableError": "unavailable",
        "ProcessError": "unavailable",
        "TunnelError": "failed_precondition",
    }
    for name in codes:
        assert issubclass(getattr(otterscale.common, name), otterscale.common.OtterscaleError)


def test_common_imports_no_service() -> None:
    src = pathlib.Path(otterscale.common.__file__).parent
    for path in src.glob("*.py"):
        text = path.read_text()
        for forbidden in ("otterscale.hub", "otterscale.agent", "otterscale.testing"):
            assert f"import {forbidden}" not in text, (path, forbidden)
            assert f"from {forbidden}" not in text, (path, forbidden)
