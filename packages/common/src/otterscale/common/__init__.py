"""otterscale-common: what the OtterScale hub and agent share.

Configuration (``otterscale.yaml``), OIDC bearer-token verification, the verified caller
(:class:`Identity`), the signed hub-to-agent identity headers, logging set-up, the ``otterscale``
command and the flags both services take. Nothing here knows about a particular service.

Only the names in ``__all__`` are public; the underscore modules may change at any time.
"""

from ._cli import (
    CONTAINER_CONFIG,
    CONTAINER_ENV,
    DEFAULT_ADDRESS,
    DEFAULT_CONFIG,
    ENTRY_POINT_GROUP,
    CommandMain,
    CommonOptions,
    add_common_arguments,
    container_mode,
    parse_address,
    resolve_defaults,
)
from ._config import (
    MAX_CONFIG_BYTES,
    AgentAuth,
    AgentConfig,
    ClusterConfig,
    KeycloakConfig,
    OtterscaleConfig,
    TunnelConfig,
    TunnelServerConfig,
    load_config,
    parse_config,
)
from ._errors import (
    AuthenticationError,
    ConfigError,
    IdentityHeaderError,
    IdentityProviderUnavailableError,
    OtterscaleError,
    UsageError,
)
from ._identity import RESERVED_PREFIXES, Identity
from ._logging import LogFormat, RedactingFilter, configure_logging, redact
from ._oidc import ALLOWED_ALGORITHMS, OIDCVerifier
from ._signing import (
    GROUPS_HEADER,
    IDENTITY_HEADER_PREFIX,
    SIGNATURE_HEADER,
    SUBJECT_HEADER,
    TIMESTAMP_HEADER,
    derive_identity_key,
    sign_identity,
    strip_identity_headers,
    verify_identity,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "CONTAINER_CONFIG",
    "CONTAINER_ENV",
    "DEFAULT_ADDRESS",
    "DEFAULT_CONFIG",
    "ENTRY_POINT_GROUP",
    "GROUPS_HEADER",
    "IDENTITY_HEADER_PREFIX",
    "MAX_CONFIG_BYTES",
    "RESERVED_PREFIXES",
    "SIGNATURE_HEADER",
    "SUBJECT_HEADER",
    "TIMESTAMP_HEADER",
    "AgentAuth",
    "AgentConfig",
    "AuthenticationError",
    "ClusterConfig",
    "CommandMain",
    "CommonOptions",
    "ConfigError",
    "Identity",
    "IdentityHeaderError",
    "IdentityProviderUnavailableError",
    "KeycloakConfig",
    "LogFormat",
    "OIDCVerifier",
    "OtterscaleConfig",
    "OtterscaleError",
    "RedactingFilter",
    "TunnelConfig",
    "TunnelServerConfig",
    "UsageError",
    "add_common_arguments",
    "configure_logging",
    "container_mode",
    "derive_identity_key",
    "load_config",
    "parse_address",
    "parse_config",
    "redact",
    "resolve_defaults",
    "sign_identity",
    "strip_identity_headers",
    "verify_identity",
]
