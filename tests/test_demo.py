"""The demo gateway over a real socket, driven by the official OpenAI and Anthropic SDKs.

The mock upstream and the proxy both run in-process under uvicorn on port 0. Refusals
of capabilities that are not in this branch (scoping, rate limits, overload) come from a
stub layer inside the governor stack, refusing the way a governor middleware does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from examples.demo_proxy import Settings, build_app, check_workers
from examples.forwarder import UpstreamSettings, bare_app
from examples.mock_upstream import MockUpstream
from examples.serving import serve
from governor import Config, Governor, load_config
from governor.config import KeyEntry
from governor.errors import Overloaded, PermissionDenied, RateLimited, RequestError
from governor.types import ASGIApp, Receive, Scope, Send

ROOT = Path(__file__).resolve().parent.parent
UP_OPENAI = "sk-upstream-openai"
UP_ANTHROPIC = "sk-ant-upstream"
KEY = "ck_test"
HELLO: Any = [{"role": "user", "content": "Hello"}]


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDKs read credentials and base URLs from the environment: keep them out."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "ANTHROPIC_")):
            monkeypatch.delenv(name)


@pytest.fixture
async def mock() -> AsyncIterator[tuple[MockUpstream, str]]:
    upstream = MockUpstream()
    async with serve(upstream) as url:
        yield upstream, url


class Refuser:
    """A stand-in governor layer: refuses governed model calls with ``make()``, counting them."""

    def __init__(self, app: ASGIApp, governor: Governor, make: Callable[[], RequestError]):
        self.app = app
        self.governor = governor
        self.make = make
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entered = await self.governor.enter(scope, receive, send)
        if entered is None:
            return
        ctx, receive, send = entered
        if ctx is None or ctx.model is None:
            await self.app(scope, receive, send)
            return
        self.calls += 1
        await self.governor.refuse(ctx, send, self.make())


@contextlib.asynccontextmanager
async def gateway(
    upstream_url: str,
    *,
    config: Config | None = None,
    middleware: Sequence[Callable[[ASGIApp], ASGIApp]] = (),
    governor: Governor | None = None,
    read_timeout_s: float = 30.0,
) -> AsyncIterator[str]:
    gov = governor or Governor(config or Config(demo_keys=True))
    upstream = UpstreamSettings.for_root(
        upstream_url,
        openai_key=UP_OPENAI,
        anthropic_key=UP_ANTHROPIC,
        read_timeout_s=read_timeout_s,
    )
    async with serve(build_app(gov, upstream, middleware=middleware)) as url:
        yield url


@pytest.fixture
async def proxy(mock: tuple[MockUpstream, str]) -> AsyncIterator[str]:
    async with gateway(mock[1]) as url:
        yield url


def oai(url: str, key: str = KEY, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1/managed", api_key=key, max_retries=retries)


def ant(url: str, key: str = KEY, retries: int = 0) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=retries)


def record_delays(client: Any, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record each retry delay the SDK computes, and skip the actual wait."""
    original = client._calculate_retry_timeout
    delays: list[float] = []

    def instead(*args: Any, **kwargs: Any) -> float:
        delays.append(original(*args, **kwargs))
        return 0.0

    monkeypatch.setattr(client, "_calculate_retry_timeout", instead)
    return delays


# --- the SDKs, happy paths ------------------------------------------------------------


async def test_openai_chat(proxy: str) -> None:
    """Chat completions through the gateway, with usage and governor's headers."""
    async with oai(proxy) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5-5", messages=HELLO
        )
        reply = raw.parse()
    assert raw.headers["x-hypereal-managed-governor"] == "active"
    assert raw.headers["x-hypereal-request-id"].startswith("req_")
    assert reply.choices[0].message.content == "Hello from the mock"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 4


async def test_openai_chat_stream(proxy: str) -> None:
    """Streaming chat ends with the usage chunk when include_usage is asked."""
    async with oai(proxy) as client:
        stream = await client.chat.completions.create(
            model="gpt-5-5",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the mock"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_openai_responses(proxy: str) -> None:
    """The Responses API, plain and streamed, with output_text and usage."""
    async with oai(proxy) as client:
        reply = await client.responses.create(model="gpt-5-5", input="Hello")
        assert reply.output_text == "Hello from the mock"
        assert reply.usage is not None
        assert reply.usage.output_tokens == 4
        stream = await client.responses.create(model="gpt-5-5", input="Hello", stream=True)
        events = [event async for event in stream]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Hello from the mock"
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None


async def test_openai_images(proxy: str) -> None:
    """Image generations answer b64_json images with usage."""
    async with oai(proxy) as client:
        result = await client.images.generate(model="gpt-image-2", prompt="a cat", n=2)
    assert result.data is not None
    assert len(result.data) == 2
    assert result.data[0].b64_json
    assert result.usage is not None
    assert result.usage.output_tokens == 544


async def test_chat_with_image_modality(proxy: str) -> None:
    """Chat with modalities image+text returns a base64 data URL in the message."""
    async with oai(proxy) as client:
        reply = await client.chat.completions.create(
            model="nano-banana-2", messages=HELLO, extra_body={"modalities": ["image", "text"]}
        )
    images = (reply.choices[0].message.model_extra or {})["images"]
    assert images[0]["image_url"]["url"].startswith("data:image/png;base64,")


async def test_anthropic_messages(proxy: str) -> None:
    """Messages at the Anthropic-native root, with cache usage fields."""
    async with ant(proxy) as client:
        reply = await client.messages.create(
            model="claude-sonnet-4-7",
            max_tokens=64,
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "Hello"}],
        )
    assert reply.content[0].type == "text"
    assert reply.content[0].text == "Hello from the mock"
    assert reply.usage.output_tokens == 4
    assert reply.usage.cache_read_input_tokens
    assert reply.usage.cache_creation_input_tokens


async def test_anthropic_stream(proxy: str) -> None:
    """The Anthropic SDK's stream helper assembles the full event sequence."""
    async with (
        ant(proxy) as client,
        client.messages.stream(
            model="claude-sonnet-4-7", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
        ) as stream,
    ):
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello from the"
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 3


async def test_anthropic_count_tokens(proxy: str) -> None:
    """count_tokens is forwarded and answered."""
    async with ant(proxy) as client:
        counted = await client.messages.count_tokens(
            model="claude-sonnet-4-7", messages=[{"role": "user", "content": "Hello"}]
        )
    assert counted.input_tokens > 0


# --- governor's errors as the SDKs' exceptions ----------------------------------------


async def test_bad_key_is_authentication_error(mock: tuple[MockUpstream, str]) -> None:
    """With a config file only its keys pass: others are AuthenticationError in both SDKs."""
    config = Config(keys={"alice": KeyEntry(account="acme", key="ck_alice")})
    async with gateway(mock[1], config=config) as url:
        async with oai(url, key="ck_stranger") as client:
            with pytest.raises(openai.AuthenticationError) as oe:
                await client.chat.completions.create(model="gpt-5-5", messages=HELLO)
        async with ant(url, key="ck_stranger") as aclient:
            with pytest.raises(anthropic.AuthenticationError) as ae:
                await aclient.messages.create(
                    model="claude-sonnet-4-7", max_tokens=8, messages=HELLO
                )
        async with oai(url, key="ck_alice") as client:
            await client.chat.completions.create(model="gpt-5-5", messages=HELLO)
    assert oe.value.status_code == 401
    assert ae.value.status_code == 401
    assert ae.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


async def test_unknown_model_and_bad_field(proxy: str) -> None:
    """An unknown model is NotFoundError, a bad field BadRequestError, in both SDKs."""
    async with oai(proxy) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-9", messages=HELLO)
        with pytest.raises(openai.BadRequestError) as oe:
            await client.chat.completions.create(model="gpt-5-5", messages=HELLO, max_tokens=0)
    async with ant(proxy) as aclient:
        with pytest.raises(anthropic.NotFoundError):
            await aclient.messages.create(model="claude-9", max_tokens=8, messages=HELLO)
        with pytest.raises(anthropic.BadRequestError):
            await aclient.messages.create(model="claude-sonnet-4-7", max_tokens=0, messages=HELLO)
    assert oe.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("make", "openai_exc", "anthropic_exc"),
    [
        (
            lambda: PermissionDenied("Not your model.", code="model_not_allowed"),
            openai.PermissionDeniedError,
            anthropic.PermissionDeniedError,
        ),
        (
            lambda: RateLimited("Slow down.", retry_after=2),
            openai.RateLimitError,
            anthropic.RateLimitError,
        ),
        (lambda: Overloaded("Busy."), openai.InternalServerError, anthropic.OverloadedError),
    ],
    ids=["403", "429", "overloaded"],
)
async def test_refusals_reach_sdks_as_their_classes(
    mock: tuple[MockUpstream, str],
    make: Callable[[], RequestError],
    openai_exc: type[Exception],
    anthropic_exc: type[Exception],
) -> None:
    """A governor refusal arrives as the SDK's own exception class, in the caller's shape."""
    governor = Governor(Config(demo_keys=True))
    async with gateway(
        mock[1], governor=governor, middleware=[lambda app: Refuser(app, governor, make)]
    ) as url:
        async with oai(url) as client:
            with pytest.raises(openai_exc):
                await client.chat.completions.create(model="gpt-5-5", messages=HELLO)
        async with ant(url) as aclient:
            with pytest.raises(anthropic_exc):
                await aclient.messages.create(
                    model="claude-sonnet-4-7", max_tokens=8, messages=HELLO
                )
    assert not mock[0].requests  # nothing reached the upstream


async def test_sdks_obey_should_retry_false(
    mock: tuple[MockUpstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """x-should-retry: false stops both SDKs from retrying a 429."""
    governor = Governor(Config(demo_keys=True))
    refusers: list[Refuser] = []

    def layer(app: ASGIApp) -> ASGIApp:
        refusers.append(
            Refuser(app, governor, lambda: RateLimited("Budget gone.", should_retry=False))
        )
        return refusers[-1]

    async with gateway(mock[1], governor=governor, middleware=[layer]) as url:
        async with oai(url, retries=3) as client:
            record_delays(client, monkeypatch)
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="gpt-5-5", messages=HELLO)
        async with ant(url, retries=3) as aclient:
            record_delays(aclient, monkeypatch)
            with pytest.raises(anthropic.RateLimitError):
                await aclient.messages.create(
                    model="claude-sonnet-4-7", max_tokens=8, messages=HELLO
                )
    assert refusers[0].calls == 2  # one attempt each


async def test_sdks_retry_after_governor_retry_after(
    mock: tuple[MockUpstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """x-should-retry: true makes both SDKs retry (even a 403), waiting Retry-After."""
    governor = Governor(Config(demo_keys=True))
    refusers: list[Refuser] = []

    def layer(app: ASGIApp) -> ASGIApp:
        refusers.append(
            Refuser(
                app,
                governor,
                lambda: PermissionDenied("Wait a bit.", retry_after=3, should_retry=True),
            )
        )
        return refusers[-1]

    async with gateway(mock[1], governor=governor, middleware=[layer]) as url:
        async with oai(url, retries=2) as client:
            openai_delays = record_delays(client, monkeypatch)
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="gpt-5-5", messages=HELLO)
        async with ant(url, retries=2) as aclient:
            anthropic_delays = record_delays(aclient, monkeypatch)
            with pytest.raises(anthropic.PermissionDeniedError):
                await aclient.messages.create(
                    model="claude-sonnet-4-7", max_tokens=8, messages=HELLO
                )
    assert refusers[0].calls == 6  # 1 + 2 retries, twice
    assert openai_delays == [3.0, 3.0]
    assert anthropic_delays == [3.0, 3.0]


# --- the forwarding proxy -------------------------------------------------------------


async def test_stream_is_not_buffered_and_disconnect_closes_upstream(
    mock: tuple[MockUpstream, str], proxy: str
) -> None:
    """The first chunk arrives while the upstream is still generating; leaving stops it."""
    upstream, _ = mock
    body = {"model": "gpt-5-5", "messages": HELLO, "stream": True}
    headers = {"authorization": f"Bearer {KEY}", "x-mock-chunk-delay-ms": "30000"}
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            proxy + "/v1/managed/chat/completions", json=body, headers=headers
        )
        seen = b""
        while b'"content":"Hello ' not in seen:
            seen += await asyncio.wait_for(response.content.readany(), 5)
        assert upstream.active == 1  # the upstream has not finished: nothing was buffered
        response.close()
    await asyncio.wait_for(upstream.left.wait(), 5)
    assert upstream.disconnects == 1


async def test_leaving_before_the_first_byte_closes_upstream(
    mock: tuple[MockUpstream, str], proxy: str
) -> None:
    """A client that leaves while the upstream has not answered yet closes its request."""
    upstream, _ = mock
    body = {"model": "claude-sonnet-4-7", "max_tokens": 8, "messages": HELLO}
    headers = {"x-api-key": KEY, "x-mock-first-byte-ms": "30000"}
    async with aiohttp.ClientSession() as session:
        call = asyncio.ensure_future(
            session.post(proxy + "/v1/messages", json=body, headers=headers)
        )
        await asyncio.wait_for(upstream.arrived.wait(), 5)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    await asyncio.wait_for(upstream.left.wait(), 5)
    assert upstream.disconnects == 1


async def test_upstream_down_is_502_in_callers_shape() -> None:
    """An upstream that refuses connections is a 502 in the OpenAI or Anthropic shape."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with gateway(dead) as url:
        async with oai(url) as client:
            with pytest.raises(openai.APIStatusError) as oe:
                await client.chat.completions.create(model="gpt-5-5", messages=HELLO)
        async with ant(url) as aclient:
            with pytest.raises(anthropic.APIStatusError) as ae:
                await aclient.messages.create(
                    model="claude-sonnet-4-7", max_tokens=8, messages=HELLO
                )
    assert oe.value.status_code == 502
    assert oe.value.code == "upstream_unavailable"
    assert ae.value.status_code == 502
    assert ae.value.body["type"] == "error"  # type: ignore[index]


async def test_upstream_timeout_is_504(mock: tuple[MockUpstream, str]) -> None:
    """An upstream slower than the read timeout is a 504 in the caller's shape."""
    async with gateway(mock[1], read_timeout_s=0.2) as url, ant(url) as aclient:
        with pytest.raises(anthropic.APIStatusError) as ae:
            await aclient.messages.create(
                model="claude-sonnet-4-7",
                max_tokens=8,
                messages=HELLO,
                extra_headers={"X-Mock-First-Byte-Ms": "3000"},
            )
    assert ae.value.status_code == 504
    assert ae.value.body["error"]["type"] == "timeout_error"  # type: ignore[index]


async def test_broken_stream_ends_with_error_event(proxy: str) -> None:
    """An upstream that cuts a stream mid-way makes the SDK raise, not end quietly."""
    async with oai(proxy) as client:
        stream = await client.chat.completions.create(
            model="gpt-5-5",
            messages=HELLO,
            stream=True,
            extra_headers={"X-Mock-Drop-After-Chunks": "2"},
        )
        with pytest.raises(openai.APIError, match="broke mid-stream"):
            _ = [chunk async for chunk in stream]

    async def read_anthropic_stream(aclient: anthropic.AsyncAnthropic) -> None:
        async with aclient.messages.stream(
            model="claude-sonnet-4-7",
            max_tokens=8,
            messages=HELLO,
            extra_headers={"X-Mock-Drop-After-Chunks": "1"},
        ) as stream2:
            async for _ in stream2:
                pass

    async with ant(proxy) as aclient:
        with pytest.raises(anthropic.APIStatusError, match="broke mid-stream"):
            await read_anthropic_stream(aclient)


async def test_upstream_errors_pass_through(proxy: str) -> None:
    """An upstream 529 reaches the Anthropic SDK as OverloadedError, body intact."""
    async with ant(proxy) as aclient:
        with pytest.raises(anthropic.OverloadedError):
            await aclient.messages.create(
                model="claude-sonnet-4-7",
                max_tokens=8,
                messages=HELLO,
                extra_headers={"X-Mock-Status": "529"},
            )


async def test_credentials_replaced_and_governor_headers_stripped(
    mock: tuple[MockUpstream, str], proxy: str
) -> None:
    """The upstream sees its own credentials, no governor headers, and X-Mock-* intact."""
    upstream, _ = mock
    extra = {
        "X-Hypereal-Cache": "true",
        "X-Session-Id": "s1",
        "X-Claude-Code-Session-Id": "cc1",
        "X-Mock-Chunks": "2",
    }
    async with oai(proxy) as client:
        reply = await client.chat.completions.create(
            model="gpt-5-5", messages=HELLO, extra_headers=extra
        )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2
    async with ant(proxy) as aclient:
        await aclient.messages.create(
            model="claude-sonnet-4-7", max_tokens=8, messages=HELLO, extra_headers=extra
        )
    seen_openai, seen_anthropic = upstream.requests
    assert seen_openai.path == "/v1/chat/completions"
    assert seen_openai.headers["authorization"] == f"Bearer {UP_OPENAI}"
    assert "x-api-key" not in seen_openai.headers
    assert seen_anthropic.path == "/v1/messages"
    assert seen_anthropic.headers["x-api-key"] == UP_ANTHROPIC
    assert "authorization" not in seen_anthropic.headers
    assert seen_anthropic.headers["anthropic-version"]
    for seen in (seen_openai, seen_anthropic):
        assert KEY not in str(seen.headers)
        assert not [h for h in seen.headers if h.startswith("x-hypereal-")]
        assert "x-session-id" not in seen.headers
        assert seen.headers["x-claude-code-session-id"] == "cc1"
        assert seen.headers["x-mock-chunks"] == "2"


async def test_forwards_on_the_normalised_surface(
    mock: tuple[MockUpstream, str], proxy: str
) -> None:
    """//v1/messages/?beta=true goes to the upstream's /v1/messages with its query."""
    body = {"model": "claude-sonnet-4-7", "max_tokens": 8, "messages": HELLO}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy + "//v1/messages/?beta=true", json=body, headers={"x-api-key": KEY}
        ) as response,
    ):
        assert response.status == 200
        assert (await response.json())["type"] == "message"
    seen = mock[0].requests[-1]
    assert (seen.path, seen.query) == ("/v1/messages", "beta=true")


async def test_models_filtered_by_key_scope(mock: tuple[MockUpstream, str]) -> None:
    """GET /v1/managed/models lists only the calling key's models; a demo key sees all."""
    config = Config(
        demo_keys=True,
        keys={"a": KeyEntry(account="acme", key="ck_scoped", models=("gpt-5-5", "gpt-image-2"))},
    )
    async with gateway(mock[1], config=config) as url:
        async with oai(url, key="ck_scoped") as client:
            scoped = [m.id async for m in client.models.list()]
        async with oai(url) as client:
            everything = [m async for m in client.models.list()]
    assert scoped == ["gpt-5-5", "gpt-image-2"]
    assert len(everything) == 13
    assert everything[0].object == "model"


async def test_healthz_and_metrics(proxy: str) -> None:
    """/healthz answers 200 and /metrics serves governor's Prometheus families."""
    async with oai(proxy) as client:
        await client.chat.completions.create(model="gpt-5-5", messages=HELLO)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy + "/healthz") as health:
            assert health.status == 200
        async with session.get(proxy + "/metrics") as metrics:
            text = await metrics.text()
    assert metrics.status == 200
    assert 'governor_requests_total{status="200",surface="chat.completions"} 1.0' in text


async def test_mock_usage_is_deterministic_and_can_be_left_out(proxy: str) -> None:
    """The same request gets the same usage; X-Mock-No-Usage leaves it out."""
    async with ant(proxy) as aclient:
        first = await aclient.messages.create(
            model="claude-sonnet-4-7", max_tokens=8, messages=HELLO
        )
        second = await aclient.messages.create(
            model="claude-sonnet-4-7", max_tokens=8, messages=HELLO
        )
    assert first.usage == second.usage
    async with oai(proxy) as client:
        reply = await client.chat.completions.create(
            model="gpt-5-5", messages=HELLO, extra_headers={"X-Mock-No-Usage": "1"}
        )
    assert reply.usage is None


async def test_bare_forwarder_without_governor(mock: tuple[MockUpstream, str]) -> None:
    """The bare forwarding app proxies on its own, with no governor headers."""
    upstream = UpstreamSettings.for_root(mock[1], openai_key=UP_OPENAI)
    async with serve(bare_app(upstream)) as url, oai(url, key="anything") as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5-5", messages=HELLO
        )
    assert "x-hypereal-managed-governor" not in raw.headers
    assert raw.parse().choices[0].message.content == "Hello from the mock"
    assert mock[0].requests[-1].headers["authorization"] == f"Bearer {UP_OPENAI}"


# --- the command line -----------------------------------------------------------------


def test_settings_from_flags_and_environment() -> None:
    """Flags win over GOVERNOR_* variables; upstream keys come from the environment."""
    environ = {
        "GOVERNOR_UPSTREAM": "http://up:1/",
        "GOVERNOR_PORT": "9001",
        "GOVERNOR_WORKERS": "3",
        "OPENAI_API_KEY": "sk-o",
        "GOVERNOR_ANTHROPIC_API_KEY": "sk-a",
    }
    settings = Settings.parse(["--port", "9002", "--redis-url", "redis://r:6379/1"], environ)
    assert (settings.port, settings.workers) == (9002, 3)
    upstream = settings.upstream_settings()
    assert (upstream.openai_url, upstream.anthropic_url) == ("http://up:1/v1", "http://up:1")
    assert (upstream.openai_key, upstream.anthropic_key) == ("sk-o", "sk-a")
    config = settings.config()
    assert (config.backend, config.redis.url, config.demo_keys) == (
        "redis",
        "redis://r:6379/1",
        True,
    )
    assert check_workers(settings, config) is None
    assert (
        Settings.parse(["--config", str(ROOT / "examples" / "governor.toml")], {})
        .config()
        .demo_keys
        is False
    )


def test_example_config_has_every_knob() -> None:
    """examples/governor.toml sets every field of every section of the config."""
    text = (ROOT / "examples" / "governor.toml").read_text()
    config = load_config(ROOT / "examples" / "governor.toml", environ={})
    import dataclasses

    for section in ("redis", "admission", "ratelimit", "breaker", "fingerprint", "billing"):
        for field in dataclasses.fields(getattr(config, section)):
            assert f"\n{field.name} =" in text or f"\n# {field.name} =" in text, (
                section,
                field.name,
            )
    assert config.keys
    assert config.accounts
    assert config.models


def test_several_workers_on_memory_are_refused() -> None:
    """--workers 2 without Redis exits at once with a message saying why."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVERNOR_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo_proxy.py"), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert "--workers 2 needs Redis" in done.stderr
    assert "--redis-url" in done.stderr


async def test_admin_routes_need_the_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """With GOVERNOR_ADMIN_TOKEN the suspension admin routes are mounted, behind the token."""
    from examples.demo_proxy import extra_routes
    from governor import Governor
    from tests.helpers import call

    monkeypatch.setenv("GOVERNOR_ADMIN_TOKEN", "s3cret")
    from starlette.applications import Starlette

    app = Starlette(routes=extra_routes(Governor()))
    ok = await call(
        app, "GET", "/admin/fingerprint/suspensions", headers={"authorization": "Bearer s3cret"}
    )
    assert ok.status == 200
    denied = await call(app, "GET", "/admin/fingerprint/suspensions")
    assert denied.status == 401
    forced = await call(
        app, "POST", "/admin/breakers/gpt-5-5/open", headers={"authorization": "Bearer s3cret"}
    )
    assert forced.status == 200
    assert (await call(app, "POST", "/admin/breakers/gpt-5-5/open")).status == 401


def test_admin_routes_absent_without_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an admin token no admin route is mounted."""
    from examples.demo_proxy import extra_routes
    from governor import Governor

    monkeypatch.delenv("GOVERNOR_ADMIN_TOKEN", raising=False)
    paths = [getattr(r, "path", "") for r in extra_routes(Governor())]
    assert not any(p.startswith("/admin") for p in paths)


def test_tune_gc_freezes_and_raises_the_young_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving starts with the start-up heap frozen and gen 0 collected less often;
    GOVERNOR_GC_TUNE=0 leaves Python's defaults."""
    import gc

    from examples.serving import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    monkeypatch.setenv("GOVERNOR_GC_TUNE", "0")
    tune_gc()
    assert gc.get_threshold() == before
    monkeypatch.delenv("GOVERNOR_GC_TUNE")
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
