"""The Kubernetes Status reason -> Connect code table of api.md, and the boundary translation."""

from __future__ import annotations

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.agent._errors import (
    InvalidRequestError,
    KubernetesAPIError,
    ManifestError,
    UnknownKindError,
    status_code,
    to_connect_error,
)

API_MD_TABLE = {
    "Unauthorized": Code.UNAUTHENTICATED,
    "Forbidden": Code.PERMISSION_DENIED,
    "NotFound": Code.NOT_FOUND,
    "AlreadyExists": Code.ALREADY_EXISTS,
    "Conflict": Code.FAILED_PRECONDITION,
    "Gone": Code.NOT_FOUND,
    "Invalid": Code.INVALID_ARGUMENT,
    "BadRequest": Code.INVALID_ARGUMENT,
    "ServerTimeout": Code.DEADLINE_EXCEEDED,
    "Timeout": Code.DEADLINE_EXCEEDED,
    "TooManyRequests": Code.RESOURCE_EXHAUSTED,
    "RequestEntityTooLarge": Code.RESOURCE_EXHAUSTED,
    "MethodNotAllowed": Code.UNIMPLEMENTED,
    "NotAcceptable": Code.INVALID_ARGUMENT,
    "UnsupportedMediaType": Code.INVALID_ARGUMENT,
    "Expired": Code.INVALID_ARGUMENT,
    "ServiceUnavailable": Code.UNAVAILABLE,
    "InternalError": Code.INTERNAL,
    "StoreReadError": Code.INTERNAL,
    "SomethingNew": Code.INTERNAL,
}


@pytest.mark.parametrize(("reason", "code"), list(API_MD_TABLE.items()))
def test_reason_table(reason: str, code: Code) -> None:
    assert status_code(reason, 500) is code


@pytest.mark.parametrize(
    ("http_status", "code"),
    [(404, Code.NOT_FOUND), (403, Code.PERMISSION_DENIED), (503, Code.UNAVAILABLE), (502, Code.INTERNAL)],
)
def test_reasonless_status_uses_http_code(http_status: int, code: Code) -> None:
    assert status_code("", http_status) is code


def test_kubernetes_message_is_kept() -> None:
    status = {
        "kind": "Status",
        "reason": "Forbidden",
        "message": 'configmaps is forbidden: User "u" cannot list',
        "code": 403,
    }
    error = to_connect_error(KubernetesAPIError(403, status))
    assert error.code is Code.PERMISSION_DENIED
    assert error.message == status["message"]


def test_plain_text_error_body_is_kept_briefly() -> None:
    error = to_connect_error(KubernetesAPIError(503, None, "upstream connect error " * 100))
    assert error.code is Code.UNAVAILABLE
    assert error.message.startswith("upstream connect error")
    assert len(error.message) <= 500


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ManifestError("bad"), Code.INVALID_ARGUMENT),
        (InvalidRequestError("bad"), Code.INVALID_ARGUMENT),
        (UnknownKindError("no"), Code.NOT_FOUND),
    ],
)
def test_own_errors_are_precise(exc: Exception, code: Code) -> None:
    assert to_connect_error(exc).code is code


def test_connect_errors_pass_through() -> None:
    original = ConnectError(Code.ABORTED, "x")
    assert to_connect_error(original) is original


def test_unexpected_errors_hide_details(caplog: pytest.LogCaptureFixture) -> None:
    error = to_connect_error(KeyError("secret-internal-detail"))
    assert error.code is Code.INTERNAL
    assert "secret-internal-detail" not in error.message
    assert "Traceback" not in error.message
    assert "unexpected error" in caplog.text
