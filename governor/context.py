"""One request context, parsed once and cached on the ASGI scope.

Whichever governor middleware sees a request first parses it (path, key, body, model,
caps) into a :class:`RequestContext` stored at ``scope[SCOPE_KEY]``; every middleware
after it, stacked or not, reads that same object. Parsing refuses bad input with a
:class:`~governor.errors.RequestError` in the caller's shape before anything is
consumed.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from governor import headers as h
from governor.catalog import Catalog, Kind, ModelSpec
from governor.config import KeyPolicy
from governor.errors import (
    AuthenticationFailed,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestError,
    Shape,
)
from governor.keys import KeyResolver, key_id
from governor.response import ResponseObserver
from governor.tokens import estimate_input_tokens
from governor.types import Message, RawHeaders, Receive, Scope

SCOPE_KEY = "governor.context"

# A layer's response headers: fixed at admission, or made when the response starts
# (from the request context as it stands then, and the start message). A callable is
# handed the context rather than holding it: the context holds the callable, and a
# reference cycle per request would leave every request to the garbage collector.
HeaderSource = RawHeaders | Callable[["RequestContext", Message], RawHeaders]

MAX_IMAGES = 10


class Surface(enum.Enum):
    """The API surfaces governor governs."""

    CHAT = "chat.completions"
    RESPONSES = "responses"
    IMAGES = "images.generations"
    MESSAGES = "messages"
    COUNT_TOKENS = "messages.count_tokens"
    MODELS = "models"

    @property
    def shape(self) -> Shape:
        if self in (Surface.MESSAGES, Surface.COUNT_TOKENS):
            return Shape.ANTHROPIC
        return Shape.OPENAI


# Normalised path -> (surface, method, native Anthropic root).
ROUTES: dict[str, tuple[Surface, str, bool]] = {
    "/v1/managed/chat/completions": (Surface.CHAT, "POST", False),
    "/v1/managed/responses": (Surface.RESPONSES, "POST", False),
    "/v1/managed/images/generations": (Surface.IMAGES, "POST", False),
    "/v1/managed/messages": (Surface.MESSAGES, "POST", False),
    "/v1/managed/messages/count_tokens": (Surface.COUNT_TOKENS, "POST", False),
    "/v1/messages": (Surface.MESSAGES, "POST", True),
    "/v1/messages/count_tokens": (Surface.COUNT_TOKENS, "POST", True),
    "/v1/managed/models": (Surface.MODELS, "GET", False),
}

_CACHE = h.wire(h.CACHE)
_SESSION_ID = h.wire(h.SESSION_ID)
_CLAUDE_CODE_SESSION_ID = h.wire(h.CLAUDE_CODE_SESSION_ID)
_SLASHES = re.compile(r"/{2,}")
_OUTPUT_CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def normalise_path(path: str) -> str:
    """Collapse repeated slashes and drop a trailing one: ``//v1/messages/`` is ``/v1/messages``.

    Servers hand ``scope["path"]`` over percent-decoded already.
    """
    if "//" in path:  # rare: most paths need no regex
        path = _SLASHES.sub("/", path)
    return path.rstrip("/") or "/"


def match_route(scope: Scope) -> tuple[Surface, str, bool] | None:
    """The governed surface of *scope*'s path, or None for anything else."""
    return ROUTES.get(normalise_path(scope.get("path", "")))


@dataclasses.dataclass(eq=False, slots=True)
class RequestContext:
    """Everything governor knows of one request. Parsed once; annotated as it runs."""

    request_id: str
    arrived: float
    arrived_wall: float
    surface: Surface
    native: bool
    path: str
    method: str
    key_id: str
    account: str
    policy: KeyPolicy
    headers: RawHeaders
    client: tuple[str, int] | None
    # Lower-case request header name -> its first value, for cheap lookups.
    header_map: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    model: ModelSpec | None = None
    model_id: str = ""
    stream: bool = False
    image_count: int = 0
    input_tokens: int = 0
    output_cap: int | None = None
    session_id: str | None = None
    cache: bool = False
    body: bytes = b""
    payload: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    response: ResponseObserver = dataclasses.field(default_factory=ResponseObserver)
    # Set by the middleware that refused the request (a reason label), so every other
    # layer knows the response is governor's own and neutral.
    refusal: str | None = None
    disconnected: bool = False
    # Per-capability annotations (queue wait, credits, insurance), read by usage logs.
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Response headers of the layers that admitted the request, outermost first (see
    # add_headers).
    header_sources: list[HeaderSource] = dataclasses.field(default_factory=list)

    @property
    def shape(self) -> Shape:
        return self.surface.shape

    @property
    def generates_images(self) -> bool:
        return self.image_count > 0

    def output_reserve(self, default: int) -> int:
        """Output tokens to reserve: the caller's cap, else *default*, within the model's max."""
        cap = self.output_cap if self.output_cap is not None else default
        if self.model is not None:
            cap = min(cap, self.model.max_output_tokens)
        return cap

    def add_headers(self, source: HeaderSource) -> None:
        """Put *source*'s headers on this request's response start, replacing any of
        the same names the response already has.

        The send wrapper of whichever governor middleware parsed the request (the
        outermost) adds them, once for every layer, so a layer needs no send wrapper
        of its own for its headers. A callable is called when the response starts, so
        it sees what happened further in (a refusal). A layer adds its headers when it
        admits the request, before it calls the app.
        """
        self.header_sources.append(source)

    def __repr__(self) -> str:
        # Never the body or headers: they carry the raw key and user content.
        return (
            f"RequestContext(id={self.request_id}, {self.surface.value}, "
            f"model={self.model_id!r}, key={self.key_id}, account={self.account!r})"
        )


_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """``req_`` + 24 hex digits: 48 random bits per process, then a counter.

    Unique across processes and restarts without a system call per request (a request
    id needs to be unique, not unpredictable).
    """
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


def get_context(scope: Scope) -> RequestContext | None:
    """The request context a governor middleware already parsed for *scope*, if any."""
    ctx: RequestContext | None = scope.get(SCOPE_KEY)
    return ctx


def shape_for(scope: Scope) -> Shape:
    """The error shape of *scope*'s path, before anything else is known."""
    route = match_route(scope)
    return route[0].shape if route else Shape.OPENAI


# --- parsing --------------------------------------------------------------------------


def extract_key(headers: RawHeaders) -> str:
    """The one API key of a request, from ``Authorization: Bearer``, ``x-api-key`` or
    ``anthropic-api-key``. Two different keys are a 400; none is a 401."""
    found: set[str] = set()
    for name, value in headers:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                found.add(token.strip())
            elif value.strip():
                raise AuthenticationFailed(
                    "The Authorization header must be 'Bearer <key>'.", code="invalid_api_key"
                )
        elif lname in (b"x-api-key", b"anthropic-api-key"):
            token = value.decode("latin-1").strip()
            if token:
                found.add(token)
    if not found:
        raise AuthenticationFailed(
            "No API key provided. Send it as 'Authorization: Bearer <key>' or 'x-api-key'.",
            code="missing_api_key",
        )
    if len(found) > 1:
        raise BadRequest(
            "The request carries two different API keys; send exactly one.",
            code="conflicting_api_keys",
        )
    return found.pop()


def _positive_int(payload: Mapping[str, Any], field: str, lo: int, hi: int) -> int | None:
    value = payload.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{field}' must be an integer.", param=field, code="invalid_type")
    if not lo <= value <= hi:
        raise BadRequest(
            f"'{field}' must be between {lo} and {hi}, got {value}.",
            param=field,
            code="invalid_value",
        )
    return value


def lookup_model(catalog: Catalog, model_id: str) -> ModelSpec | None:
    """Exact id first; then case and surrounding white space folded, so that spoofed
    spellings of a ``-max`` id (``Claude-Opus-4-7-MAX ``) still reach its rules."""
    spec = catalog.get(model_id)
    if spec is None:
        spec = catalog.get(model_id.strip().lower())
    return spec


def parse_body(body: bytes) -> Mapping[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid UTF-8.", code="invalid_encoding") from None
    if not text or text.isspace():  # not text.strip(): that copies the whole body
        raise BadRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise BadRequest(
            f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return payload


def apply_payload(ctx: RequestContext, payload: Mapping[str, Any], catalog: Catalog) -> None:
    """Fill *ctx*'s model, stream, caps and image fields from *payload*, or raise."""
    ctx.payload = payload
    model_id = payload.get("model")
    if model_id is None:
        raise BadRequest("'model' is required.", param="model", code="missing_model")
    if not isinstance(model_id, str) or not model_id.strip():
        raise BadRequest("'model' must be a non-empty string.", param="model", code="invalid_model")
    ctx.model_id = model_id
    spec = lookup_model(catalog, model_id)
    if spec is None:
        raise NotFound(
            f"The model '{model_id[:200]}' does not exist in this catalog.",
            param="model",
            code="model_not_found",
        )
    ctx.model = spec
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream", code="invalid_type")
    ctx.stream = bool(stream) and ctx.surface is not Surface.COUNT_TOKENS

    caps = [
        c
        for f in _OUTPUT_CAP_FIELDS
        if (c := _positive_int(payload, f, 1, spec.max_output_tokens)) is not None
    ]
    ctx.output_cap = min(caps) if caps else None

    if ctx.surface is Surface.IMAGES:
        n = _positive_int(payload, "n", 1, MAX_IMAGES)
        ctx.image_count = n if n is not None else 1
    elif ctx.surface is Surface.CHAT:
        modalities = payload.get("modalities")
        if modalities is not None:
            if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
                raise BadRequest(
                    "'modalities' must be a list of strings.",
                    param="modalities",
                    code="invalid_type",
                )
            if "image" in modalities:
                n = _positive_int(payload, "n", 1, MAX_IMAGES)
                ctx.image_count = n if n is not None else 1
    if ctx.image_count and spec.kind is not Kind.IMAGE:
        raise BadRequest(
            f"The model '{spec.id}' does not generate images.",
            param="model",
            code="model_not_image_capable",
        )
    if ctx.surface is Surface.IMAGES and not isinstance(payload.get("prompt"), str):
        raise BadRequest("'prompt' must be a string.", param="prompt", code="invalid_prompt")
    ctx.input_tokens = estimate_input_tokens(payload)
    cache_control = payload.get("cache_control")
    cache_header = ctx.header_map.get(_CACHE)
    ctx.cache = (cache_header is not None and cache_header.strip().lower() in (b"true", b"1")) or (
        isinstance(cache_control, Mapping) and bool(cache_control)
    )


def new_context(
    scope: Scope,
    route: tuple[Surface, str, bool],
    api_key: str,
    policy: KeyPolicy,
    *,
    request_id: str,
    arrived: float,
    arrived_wall: float,
) -> RequestContext:
    raw_headers: RawHeaders = list(scope.get("headers", ()))
    header_map = h.first_values(raw_headers)
    session = header_map.get(_SESSION_ID) or header_map.get(_CLAUDE_CODE_SESSION_ID)
    client = scope.get("client")
    return RequestContext(
        request_id=request_id,
        arrived=arrived,
        arrived_wall=arrived_wall,
        surface=route[0],
        native=route[2],
        path=normalise_path(scope.get("path", "")),
        method=scope.get("method", "GET"),
        key_id=key_id(api_key),
        account=policy.account,
        policy=policy,
        headers=raw_headers,
        header_map=header_map,
        client=(str(client[0]), int(client[1])) if client else None,
        session_id=session.decode("latin-1") if session else None,
    )


async def read_body(
    scope: Scope, receive: Receive, limit: int, headers: Mapping[bytes, bytes] | None = None
) -> bytes | None:
    """Read the whole request body, refusing more than *limit* bytes (413).

    *headers* is the request's :attr:`RequestContext.header_map`, if made already (else
    the scope's headers are scanned). Returns None if the client disconnected while
    sending it.
    """
    if headers is not None:
        declared = headers.get(b"content-length")
    else:
        declared = h.get(scope.get("headers", ()), b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        except ValueError:
            raise BadRequest("Content-Length is not a number.", code="invalid_header") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def resolve_key(resolver: KeyResolver, api_key: str) -> KeyPolicy:
    policy = await resolver.resolve(api_key)
    if policy is None:
        raise AuthenticationFailed("The API key is not valid.", code="invalid_api_key")
    return policy


def check_method(scope: Scope, route: tuple[Surface, str, bool]) -> None:
    if scope.get("method") != route[1]:
        raise MethodNotAllowed(
            f"{scope.get('method')} is not allowed here; use {route[1]}.",
            headers=[(b"allow", route[1].encode())],
        )


__all__ = [
    "ROUTES",
    "SCOPE_KEY",
    "RequestContext",
    "RequestError",
    "Surface",
    "apply_payload",
    "extract_key",
    "get_context",
    "match_route",
    "normalise_path",
    "parse_body",
    "read_body",
    "shape_for",
]
