"""Error bodies and headers in each caller's shape."""

from __future__ import annotations

import json

import pytest

from governor import errors as e
from governor.errors import Shape


@pytest.mark.parametrize(
    ("error", "openai", "anthropic"),
    [
        (e.BadRequest("x"), (400, "invalid_request_error"), (400, "invalid_request_error")),
        (
            e.AuthenticationFailed("x"),
            (401, "invalid_request_error"),
            (401, "authentication_error"),
        ),
        (e.PermissionDenied("x"), (403, "permission_error"), (403, "permission_error")),
        (e.NotFound("x"), (404, "invalid_request_error"), (404, "not_found_error")),
        (e.PayloadTooLarge("x"), (413, "invalid_request_error"), (413, "request_too_large")),
        (e.RateLimited("x"), (429, "rate_limit_error"), (429, "rate_limit_error")),
        (e.Overloaded("x"), (503, "service_unavailable_error"), (529, "overloaded_error")),
        (e.BadGateway("x"), (502, "api_error"), (502, "api_error")),
        (e.GatewayTimeout("x"), (504, "timeout_error"), (504, "timeout_error")),
    ],
)
def test_status_and_type(
    error: e.RequestError, openai: tuple[int, str], anthropic: tuple[int, str]
) -> None:
    """Each error has the wire-contract status and type in each shape."""
    assert (error.status_for(Shape.OPENAI), error.type_for(Shape.OPENAI)) == openai
    assert (error.status_for(Shape.ANTHROPIC), error.type_for(Shape.ANTHROPIC)) == anthropic


def test_openai_body() -> None:
    body = json.loads(e.error_body(e.BadRequest("bad", param="model", code="c"), Shape.OPENAI, "r"))
    assert body == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "model", "code": "c"}
    }


def test_anthropic_body() -> None:
    body = json.loads(e.error_body(e.RateLimited("slow"), Shape.ANTHROPIC, "req_1"))
    assert body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow"},
        "request_id": "req_1",
    }


def test_retry_headers() -> None:
    """Retry-After is whole seconds rounded up; x-should-retry is spelled out."""
    headers = dict(
        e.error_headers(e.RateLimited("x", retry_after=1.2, should_retry=False), 10, "req_1")
    )
    assert headers[b"retry-after"] == b"2"
    assert headers[b"x-should-retry"] == b"false"
    assert headers[b"x-hypereal-request-id"] == b"req_1"
    assert (
        dict(e.error_headers(e.RateLimited("x", retry_after=0.0), 1, None))[b"retry-after"] == b"1"
    )
