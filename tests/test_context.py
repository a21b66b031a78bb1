"""The request context: each field on each surface, with each auth header."""

from __future__ import annotations

from typing import Any

import pytest

from governor import Governor, get_context
from governor.clock import ManualClock
from governor.context import RequestContext, Surface
from governor.errors import Shape
from governor.keys import key_id
from governor.stack import ContextMiddleware
from governor.types import Receive, Scope, Send
from tests.helpers import auth, call

SURFACES: list[tuple[str, Surface, dict[str, Any], Shape]] = [
    (
        "/v1/managed/chat/completions",
        Surface.CHAT,
        {"model": "gpt-5-5", "messages": [{"role": "user", "content": "hi"}]},
        Shape.OPENAI,
    ),
    ("/v1/managed/responses", Surface.RESPONSES, {"model": "gpt-5-5", "input": "hi"}, Shape.OPENAI),
    (
        "/v1/managed/images/generations",
        Surface.IMAGES,
        {"model": "gpt-image-2", "prompt": "a banana"},
        Shape.OPENAI,
    ),
    (
        "/v1/managed/messages",
        Surface.MESSAGES,
        {"model": "claude-sonnet-4-7", "max_tokens": 10, "messages": []},
        Shape.ANTHROPIC,
    ),
    (
        "/v1/messages",
        Surface.MESSAGES,
        {"model": "claude-sonnet-4-7", "max_tokens": 10, "messages": []},
        Shape.ANTHROPIC,
    ),
    (
        "/v1/messages/count_tokens",
        Surface.COUNT_TOKENS,
        {"model": "claude-sonnet-4-7", "messages": []},
        Shape.ANTHROPIC,
    ),
]
AUTH_STYLES = ["bearer", "x-api-key", "anthropic-api-key"]


class Capture:
    """An app that records the context and the body it was handed."""

    def __init__(self) -> None:
        self.ctx: RequestContext | None = None
        self.body = b""
        self.after: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.ctx = get_context(scope)
        message = await receive()
        self.body = message.get("body", b"")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture
def governor() -> Governor:
    from governor.config import Config

    return Governor(Config(demo_keys=True), clock=ManualClock())


@pytest.mark.parametrize("style", AUTH_STYLES)
@pytest.mark.parametrize(("path", "surface", "payload", "shape"), SURFACES)
async def test_surface_and_key(
    governor: Governor,
    path: str,
    surface: Surface,
    payload: dict[str, Any],
    shape: Shape,
    style: str,
) -> None:
    """Each surface is recognised with each way of sending the key."""
    app = Capture()
    result = await call(
        ContextMiddleware(app, governor=governor),
        path=path,
        headers=auth("ck_alice", style),
        json_body=payload,
    )
    assert result.status == 200
    ctx = app.ctx
    assert ctx is not None
    assert ctx.surface is surface
    assert ctx.shape is shape
    assert ctx.key_id == key_id("ck_alice")
    assert ctx.account.startswith("demo-")
    assert ctx.model is not None
    assert ctx.model.id == payload["model"]
    assert ctx.native is (path.startswith("/v1/messages"))


async def test_body_replayed_byte_for_byte(governor: Governor) -> None:
    """The downstream app reads exactly the bytes the client sent."""
    raw = b'{"model":  "gpt-5-5",\n "messages": [] , "x": "\\u00e9"}'
    app = Capture()
    await call(ContextMiddleware(app, governor=governor), headers=auth(), body=raw)
    assert app.body == raw


async def test_body_in_chunks(governor: Governor) -> None:
    """A body sent in several chunks is read whole and replayed as one."""
    raw = b'{"model": "gpt-5-5", "messages": []}'
    app = Capture()
    await call(
        ContextMiddleware(app, governor=governor),
        headers=auth(),
        chunks=[raw[:5], raw[5:20], raw[20:]],
    )
    assert app.body == raw


async def test_receive_passes_through_after_replay(governor: Governor) -> None:
    """After the replayed body, receive() reaches the server (and sees a disconnect)."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((await receive())["type"])
        seen.append((await receive())["type"])
        ctx = get_context(scope)
        assert ctx is not None
        assert ctx.disconnected
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    import asyncio

    gone = asyncio.Event()
    gone.set()
    await call(
        ContextMiddleware(app, governor=governor),
        headers=auth(),
        json_body={"model": "gpt-5-5", "messages": []},
        disconnect=gone,
    )
    assert seen == ["http.request", "http.disconnect"]


async def test_parsed_once_when_stacked(governor: Governor) -> None:
    """Two stacked middlewares share one context object."""
    app = Capture()
    inner = ContextMiddleware(app, governor=governor)
    seen: list[RequestContext | None] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_context(scope))
        await inner(scope, receive, send)

    outer = ContextMiddleware(spy, governor=governor)
    await call(outer, headers=auth(), json_body={"model": "gpt-5-5", "messages": []})
    assert seen[0] is app.ctx


async def test_fields(governor: Governor) -> None:
    """Stream flag, output cap, session id, cache intent, estimate and arrival time."""
    app = Capture()
    payload = {
        "model": "claude-sonnet-4-7",
        "stream": True,
        "max_tokens": 1200,
        "cache_control": {"type": "ephemeral"},
        "messages": [{"role": "user", "content": "x" * 400}],
    }
    headers = {**auth(), "x-session-id": "coding-agent-session-123"}
    assert isinstance(governor.clock, ManualClock)
    await call(ContextMiddleware(app, governor=governor), headers=headers, json_body=payload)
    ctx = app.ctx
    assert ctx is not None
    assert ctx.stream is True
    assert ctx.output_cap == 1200
    assert ctx.session_id == "coding-agent-session-123"
    assert ctx.cache is True
    assert ctx.input_tokens == 100 + 4
    assert ctx.arrived == governor.clock.monotonic()
    assert ctx.request_id.startswith("req_")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
async def test_output_cap_fields(governor: Governor, field: str) -> None:
    """Each dialect's output cap is read."""
    app = Capture()
    await call(
        ContextMiddleware(app, governor=governor),
        headers=auth(),
        json_body={"model": "gpt-5-5", "input": "hi", field: 77},
    )
    assert app.ctx is not None
    assert app.ctx.output_cap == 77


async def test_claude_code_session_and_cache_header(governor: Governor) -> None:
    """X-Claude-Code-Session-Id and X-Hypereal-Cache are read."""
    app = Capture()
    headers = {**auth(), "x-claude-code-session-id": "s-1", "x-hypereal-cache": "true"}
    await call(
        ContextMiddleware(app, governor=governor),
        path="/v1/messages",
        query="beta=true",
        headers=headers,
        json_body={"model": "claude-sonnet-4-7", "messages": []},
    )
    assert app.ctx is not None
    assert app.ctx.session_id == "s-1"
    assert app.ctx.cache is True
    assert app.ctx.stream is False


@pytest.mark.parametrize(
    ("path", "payload", "count"),
    [
        ("/v1/managed/images/generations", {"model": "gpt-image-2", "prompt": "p"}, 1),
        ("/v1/managed/images/generations", {"model": "gpt-image-2", "prompt": "p", "n": 3}, 3),
        (
            "/v1/managed/chat/completions",
            {"model": "nano-banana-2", "messages": [], "modalities": ["image", "text"]},
            1,
        ),
        ("/v1/managed/chat/completions", {"model": "nano-banana-2", "messages": []}, 0),
    ],
)
async def test_image_requests(
    governor: Governor, path: str, payload: dict[str, Any], count: int
) -> None:
    """Images surface and chat with the image modality generate images; plain chat does not."""
    app = Capture()
    await call(
        ContextMiddleware(app, governor=governor), path=path, headers=auth(), json_body=payload
    )
    assert app.ctx is not None
    assert app.ctx.image_count == count
    assert app.ctx.generates_images is (count > 0)


async def test_request_id_header(governor: Governor) -> None:
    """The request id comes back as X-Hypereal-Request-Id, with the governor header."""
    app = Capture()
    result = await call(
        ContextMiddleware(app, governor=governor),
        headers=auth(),
        json_body={"model": "gpt-5-5", "messages": []},
    )
    assert app.ctx is not None
    assert result.header("X-Hypereal-Request-Id") == app.ctx.request_id
    assert result.header("X-Hypereal-Managed-Governor") == "active"


async def test_models_surface_needs_no_body(governor: Governor) -> None:
    """GET /v1/managed/models is governed (key checked) and has no model."""
    app = Capture()
    result = await call(
        ContextMiddleware(app, governor=governor), "GET", "/v1/managed/models", headers=auth()
    )
    assert result.status == 200
    assert app.ctx is not None
    assert app.ctx.surface is Surface.MODELS
    assert app.ctx.model is None


async def test_other_paths_pass_untouched(governor: Governor) -> None:
    """A path governor does not govern reaches the app without a context or a key."""
    app = Capture()
    result = await call(ContextMiddleware(app, governor=governor), "GET", "/healthz")
    assert result.status == 200
    assert app.ctx is None


@pytest.mark.parametrize("path", ["//v1/messages", "/v1/messages/", "/v1//messages"])
async def test_path_spellings_normalised(governor: Governor, path: str) -> None:
    """Doubled and trailing slashes still reach the messages surface."""
    app = Capture()
    await call(
        ContextMiddleware(app, governor=governor),
        path=path,
        headers=auth(),
        json_body={"model": "claude-sonnet-4-7", "messages": []},
    )
    assert app.ctx is not None
    assert app.ctx.surface is Surface.MESSAGES


async def test_model_case_and_space_folded(governor: Governor) -> None:
    """``Claude-Opus-4-7-MAX `` resolves to the catalog's -max model, raw id kept."""
    app = Capture()
    await call(
        ContextMiddleware(app, governor=governor),
        path="/v1/messages",
        headers=auth(),
        json_body={"model": "Claude-Opus-4-7-MAX ", "messages": []},
    )
    assert app.ctx is not None
    assert app.ctx.model is not None
    assert app.ctx.model.id == "claude-opus-4-7-max"
    assert app.ctx.model.cli_only
    assert app.ctx.model_id == "Claude-Opus-4-7-MAX "


async def test_repr_hides_key(governor: Governor) -> None:
    """The context's repr names the key id, never the raw key."""
    app = Capture()
    await call(
        ContextMiddleware(app, governor=governor),
        headers=auth("ck_secret_value"),
        json_body={"model": "gpt-5-5", "messages": []},
    )
    assert "ck_secret_value" not in repr(app.ctx)


async def test_refusal_carries_one_request_id(governor: Governor) -> None:
    """A refusal by a governor layer carries exactly one X-Hypereal-Request-Id."""
    from governor.errors import RateLimited

    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        assert ctx is not None
        await governor.refuse(ctx, send, RateLimited("slow down"))

    result = await call(
        ContextMiddleware(refusing, governor=governor),
        headers=auth(),
        json_body={"model": "gpt-5-5", "messages": []},
    )
    assert result.status == 429
    assert result.header_names().count("x-hypereal-request-id") == 1


def test_request_ids_are_unique() -> None:
    """Request ids never repeat within a process."""
    from governor.context import new_request_id

    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(i.startswith("req_") and len(i) == 28 for i in ids)
