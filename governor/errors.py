"""Errors governor raises and the HTTP responses it makes of them.

Exception tree::

    GovernorError                      base of everything governor raises
    ├── ConfigurationError             a bad config file, environment value or option
    ├── BackendError                   the state backend (Redis) failed or timed out
    └── RequestError                   a request refused with an HTTP error in the caller's shape
        ├── BadRequest                 400: body, JSON or field is wrong
        ├── AuthenticationFailed       401: key missing or unknown
        ├── PermissionDenied           403: model outside the key's scope, key suspended
        ├── NotFound                   404: unknown model or path
        ├── MethodNotAllowed           405
        ├── PayloadTooLarge            413
        ├── RateLimited                429: a rate guard, a full queue, or a budget
        ├── Overloaded                 503 (OpenAI) / 529 overloaded_error (Anthropic)
        ├── BadGateway                 502: the upstream could not be reached
        └── GatewayTimeout             504: the upstream did not answer in time

Responses are built here and nowhere else: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` on OpenAI-compatible paths,
Anthropic's ``{"type": "error", "error": {"type", "message"}, "request_id"}`` on
messages paths (see ``shared/notes/wire-contract.md``).
"""

from __future__ import annotations

import enum
import json
import math

from governor.types import RawHeaders, Send


class Shape(enum.Enum):
    """The error dialect a caller speaks."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class GovernorError(Exception):
    """Base class of every governor error."""


class ConfigurationError(GovernorError, ValueError):
    """A config file, environment value or constructor option is invalid."""


class BackendError(GovernorError):
    """The state backend failed, timed out or could not be reached."""


class RequestError(GovernorError):
    """A request refused with an HTTP error in the caller's own shape.

    *retry_after* is seconds until the refusal stops applying (None: don't say);
    *should_retry* becomes ``x-should-retry``, which both official SDKs obey over
    their status-code rules.
    """

    status: int = 400
    openai_type: str = "invalid_request_error"
    anthropic_type: str = "invalid_request_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        headers: RawHeaders | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.retry_after = retry_after
        self.should_retry = should_retry
        self.headers: RawHeaders = headers if headers is not None else []
        # A short machine label for metrics and usage logs ("queue_full", "rpm").
        self.reason = reason or self.code or type(self).__name__

    def status_for(self, shape: Shape) -> int:
        return self.status

    def type_for(self, shape: Shape) -> str:
        return self.anthropic_type if shape is Shape.ANTHROPIC else self.openai_type


class BadRequest(RequestError):
    """400: the request body or one of its fields is invalid."""


class AuthenticationFailed(RequestError):
    """401: the API key is missing or unknown."""

    status = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(RequestError):
    """403: the key may not do this (model scoping, suspension, client policy)."""

    status = 403
    openai_type = "permission_error"
    anthropic_type = "permission_error"
    default_code = "permission_denied"


class NotFound(RequestError):
    """404: unknown model."""

    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"
    default_code = "model_not_found"


class MethodNotAllowed(RequestError):
    """405: the path exists, the method does not."""

    status = 405
    default_code = "method_not_allowed"


class PayloadTooLarge(RequestError):
    """413: the body is larger than the configured bound."""

    status = 413
    anthropic_type = "request_too_large"
    default_code = "request_too_large"


class RateLimited(RequestError):
    """429: a rate guard, a full admission queue, or an exhausted budget."""

    status = 429
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class Overloaded(RequestError):
    """Capacity is gone for now: 503 on OpenAI paths, 529 ``overloaded_error`` on Anthropic.

    The first-party Anthropic API has no 503; its SDKs and Claude Code treat 529 as the
    overload signal and retry it.
    """

    status = 503
    openai_type = "service_unavailable_error"
    anthropic_type = "overloaded_error"
    default_code = "server_is_overloaded"

    def status_for(self, shape: Shape) -> int:
        return 529 if shape is Shape.ANTHROPIC else 503


class BadGateway(RequestError):
    """502: the upstream could not be reached or answered garbage."""

    status = 502
    openai_type = "api_error"
    anthropic_type = "api_error"
    default_code = "upstream_unavailable"


class GatewayTimeout(RequestError):
    """504: the upstream did not answer in time."""

    status = 504
    openai_type = "timeout_error"
    anthropic_type = "timeout_error"
    default_code = "upstream_timeout"


def retry_after_value(seconds: float) -> bytes:
    """Whole seconds, rounded up so a client never comes back early; at least 1."""
    return str(max(1, math.ceil(seconds))).encode()


def error_body(error: RequestError, shape: Shape, request_id: str | None) -> bytes:
    """The JSON body of *error* in *shape*."""
    if shape is Shape.ANTHROPIC:
        payload: dict[str, object] = {
            "type": "error",
            "error": {"type": error.type_for(shape), "message": error.message},
            "request_id": request_id,
        }
    else:
        payload = {
            "error": {
                "message": error.message,
                "type": error.type_for(shape),
                "param": error.param,
                "code": error.code,
            }
        }
    return json.dumps(payload, separators=(",", ":")).encode()


def error_headers(
    error: RequestError, body_length: int, request_id: str | None, *, id_header: bool = True
) -> RawHeaders:
    headers: RawHeaders = [
        (b"content-type", b"application/json"),
        (b"content-length", str(body_length).encode()),
    ]
    if error.retry_after is not None:
        headers.append((b"retry-after", retry_after_value(error.retry_after)))
    if error.should_retry is not None:
        headers.append((b"x-should-retry", b"true" if error.should_retry else b"false"))
    if request_id is not None and id_header:
        headers.append((b"x-hypereal-request-id", request_id.encode()))
    headers.extend(error.headers)
    return headers


async def send_error(
    send: Send,
    error: RequestError,
    shape: Shape,
    request_id: str | None = None,
    *,
    id_header: bool = True,
) -> None:
    """Send *error* as a complete HTTP response in the caller's *shape*.

    *id_header* False leaves ``X-Hypereal-Request-Id`` to the request's own send
    wrapper (which stamps every response of a parsed request).
    """
    body = error_body(error, shape, request_id)
    await send(
        {
            "type": "http.response.start",
            "status": error.status_for(shape),
            "headers": error_headers(error, len(body), request_id, id_header=id_header),
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
