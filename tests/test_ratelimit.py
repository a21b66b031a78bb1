"""The rate-guard middleware in every backend: limits, all-or-none, settlement, headers."""

from __future__ import annotations

import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from governor import Governor, wrap
from governor.backends import Backend
from governor.config import AccountEntry, Config, KeyEntry, ModelEntry, ModelLimits
from governor.errors import RateLimited
from governor.ratelimit import Guard
from governor.types import Receive, Scope, Send
from tests.apps import EchoApp, failing_app, sse_app
from tests.helpers import call
from tests.ratelimit_support import (
    CHAT,
    IMAGES,
    MESSAGES,
    Gate,
    chat,
    image,
    make,
    message,
    post,
    remaining,
    reserve,
)

KEY = "sk-acme-1"
OTHER = "sk-acme-2"


def acme(**key: Any) -> dict[str, KeyEntry]:
    return {
        "k1": KeyEntry(account="acme", key=KEY, **key),
        "k2": KeyEntry(account="acme", key=OTHER),
    }


# --- headers --------------------------------------------------------------------------


async def test_first_request_headers_openai(backend: Backend) -> None:
    """The spec's RPM and capacity headers, and OpenAI's family, exact after one request."""
    mw = make(EchoApp(), backend)
    body = chat(max_tokens=100)
    r = await post(mw, body)
    assert r.status == 200
    assert r.header("X-Hypereal-Managed-Model-RPM-Limit") == "15000"
    assert r.header("X-Hypereal-Managed-Model-RPM-Remaining") == "14999"
    assert r.header("X-Hypereal-Capacity-Requests-Remaining") == "9999"
    # The binding requests guard is the account (10,000 a minute by default).
    assert r.header("x-ratelimit-limit-requests") == "10000"
    assert r.header("x-ratelimit-remaining-requests") == "9999"
    assert r.header("x-ratelimit-limit-tokens") == "40000000"
    assert r.header("x-ratelimit-remaining-tokens") == str(40_000_000 - reserve(body))
    assert re.fullmatch(r"(\d+h)?(\d+m)?\d+s|\d+ms", r.header("x-ratelimit-reset-requests") or "")
    assert r.header("X-Hypereal-Managed-Image-IPM-Limit") is None
    assert r.header("anthropic-ratelimit-requests-limit") is None


async def test_image_request_headers(backend: Backend) -> None:
    """Image requests carry the IPM headers: 250 and 249 after the first image."""
    mw = make(EchoApp(), backend)
    r = await post(mw, image(n=1), IMAGES)
    assert r.status == 200
    assert r.header("X-Hypereal-Managed-Image-IPM-Limit") == "250"
    assert r.header("X-Hypereal-Managed-Image-IPM-Remaining") == "249"
    assert r.header("X-Hypereal-Managed-Model-RPM-Limit") == "250"
    assert r.header("X-Hypereal-Managed-Model-RPM-Remaining") == "249"
    r = await post(mw, image(n=3), IMAGES)
    assert r.header("X-Hypereal-Managed-Image-IPM-Remaining") == "246"


async def test_anthropic_headers(backend: Backend) -> None:
    """Anthropic paths get the anthropic-ratelimit-* family with RFC 3339 resets."""
    mw = make(EchoApp(), backend)
    body = message(max_tokens=50)
    r = await post(mw, body, MESSAGES)
    assert r.status == 200
    assert r.header("anthropic-ratelimit-requests-limit") == "10000"
    assert r.header("anthropic-ratelimit-requests-remaining") == "9999"
    for family in ("tokens", "input-tokens", "output-tokens"):
        assert r.header(f"anthropic-ratelimit-{family}-limit") == "40000000"
        left = str(40_000_000 - reserve(body))
        assert r.header(f"anthropic-ratelimit-{family}-remaining") == left
        stamp = r.header(f"anthropic-ratelimit-{family}-reset") or ""
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert r.header("x-ratelimit-limit-requests") is None
    assert r.header("X-Hypereal-Managed-Model-RPM-Remaining") == "14999"


async def test_upstream_rate_headers_replaced(backend: Backend) -> None:
    """The upstream's own x-ratelimit-* values never reach the caller beside governor's."""

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-ratelimit-remaining-requests", b"1")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})

    r = await post(make(upstream, backend), chat())
    assert [v for k, v in r.headers if k == b"x-ratelimit-remaining-requests"] == [b"9999"]


# --- each guard held exactly under concurrency ----------------------------------------

GUARDS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("model_rpm", {"models": {"gpt-5-5": ModelEntry(rpm=5)}}, chat(), CHAT),
    ("account_rpm", {"accounts": {"acme": AccountEntry(rpm=5)}}, chat(), CHAT),
    ("key_rpm", {"keys": acme(rpm=5)}, chat(), CHAT),
    (
        "key_model_rpm",
        {"keys": acme(model_limits={"gpt-5-5": ModelLimits(rpm=5)})},
        chat(),
        CHAT,
    ),
    ("model_tpm", {"models": {"gpt-5-5": ModelEntry(tpm=5 * reserve(chat()))}}, chat(), CHAT),
    ("key_tpm", {"keys": acme(tpm=5 * reserve(chat()))}, chat(), CHAT),
    (
        "key_model_tpm",
        {"keys": acme(model_limits={"gpt-5-5": ModelLimits(tpm=5 * reserve(chat()))})},
        chat(),
        CHAT,
    ),
    ("model_ipm", {"models": {"gpt-image-2": ModelEntry(ipm=10)}}, image(n=2), IMAGES),
    ("key_ipm", {"keys": acme(ipm=10)}, image(n=2), IMAGES),
    (
        "key_model_ipm",
        {"keys": acme(model_limits={"gpt-image-2": ModelLimits(ipm=10)})},
        image(n=2),
        IMAGES,
    ),
]


@pytest.mark.parametrize(("guard", "config", "body", "path"), GUARDS, ids=[g[0] for g in GUARDS])
async def test_guard_held_exactly_under_concurrency(
    backend: Backend, guard: str, config: dict[str, Any], body: dict[str, Any], path: str
) -> None:
    """30 concurrent requests against a limit worth 5: exactly 5 reach the app."""
    config.setdefault("keys", acme())
    gate = Gate(30)
    mw = make(gate, backend, Config(**config))
    results = await gate.run(mw, [post(mw, body, path, KEY) for _ in range(30)])
    statuses = sorted(r.status for r in results)
    assert statuses == [200] * 5 + [429] * 25
    refused = [r for r in results if r.status == 429]
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    assert all(r.header("x-should-retry") == "true" for r in refused)
    unit = {"rpm": "requests", "tpm": "tokens", "ipm": "images"}[guard[-3:]]
    assert all(f"Rate limit reached for {unit}" in r.json()["error"]["message"] for r in refused)


# --- all or none ----------------------------------------------------------------------

REFUSERS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("key_rpm", {"keys": acme(rpm=2)}, chat(), CHAT),
    ("key_tpm", {"keys": acme(tpm=2 * reserve(chat()))}, chat(), CHAT),
    ("key_ipm", {"keys": acme(ipm=2)}, image(n=1), IMAGES),
    ("key_model_rpm", {"keys": acme(model_limits={"gpt-5-5": ModelLimits(rpm=2)})}, chat(), CHAT),
]


@pytest.mark.parametrize(
    ("guard", "config", "body", "path"), REFUSERS, ids=[g[0] for g in REFUSERS]
)
async def test_refusal_by_one_guard_consumes_no_other(
    backend: Backend, guard: str, config: dict[str, Any], body: dict[str, Any], path: str
) -> None:
    """A request one guard refuses takes nothing from any other guard."""
    mw = make(EchoApp(payload={"ok": True}), backend, Config(**config))
    assert [(await post(mw, body, path, KEY)).status for _ in range(2)] == [200, 200]
    refused = await post(mw, body, path, KEY)
    assert refused.status == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    model = body["model"]
    spec = mw.governor.catalog[model]
    # limits' own strategy reads exactly the two admitted requests everywhere.
    assert await remaining(mw, Guard.MODEL_RPM, spec.rpm, "model", model) == spec.rpm - 2
    assert await remaining(mw, Guard.ACCOUNT_RPM, 10_000, "account", "acme") == 10_000 - 2
    per = reserve(body)
    assert await remaining(mw, Guard.MODEL_TPM, spec.tpm, "model", model) == spec.tpm - 2 * per
    if path == IMAGES:
        assert spec.ipm is not None
        assert await remaining(mw, Guard.MODEL_IPM, spec.ipm, "model", model) == spec.ipm - 2
    # Another key of the account sees the same: two requests, then its own.
    other = await post(mw, body, path, OTHER)
    assert other.status == 200
    assert other.header("X-Hypereal-Managed-Model-RPM-Remaining") == str(spec.rpm - 3)
    assert other.header("X-Hypereal-Capacity-Requests-Remaining") == str(10_000 - 3)


async def test_refusal_headers_and_retry_after(backend: Backend) -> None:
    """A 429 says when the window frees up and carries the state it was refused on."""
    config = Config(keys=acme(rpm=1))
    window = 3600
    mw = make(EchoApp(), backend, config, window_s=window)
    assert (await post(mw, chat(), key=KEY)).status == 200
    r = await post(mw, chat(), key=KEY)
    assert r.status == 429
    assert r.header("x-should-retry") == "true"
    retry = int(r.header("retry-after") or 0)
    # The one hit frees up when its window ends: an hour after the first hit in Redis
    # (windows start at the first hit), at the next epoch-aligned hour in memory.
    if backend.kind == "memory":
        import time

        expected = window - time.time() % window
    else:
        expected = window
    assert abs(retry - expected) <= 2
    assert r.header("x-ratelimit-limit-requests") == "1"
    assert r.header("x-ratelimit-remaining-requests") == "0"
    assert r.header("X-Hypereal-Managed-Model-RPM-Remaining") == "14999"
    assert "requests for this API key" in r.json()["error"]["message"]


async def test_refusal_in_anthropic_shape(backend: Backend) -> None:
    """On /v1/messages a refusal is Anthropic's rate_limit_error with retry-after."""
    mw = make(EchoApp(), backend, Config(keys=acme(rpm=1)))
    assert (await post(mw, message(), MESSAGES, KEY)).status == 200
    r = await post(mw, message(), MESSAGES, KEY)
    assert r.status == 429
    body = r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert r.header("retry-after") is not None
    assert r.header("anthropic-ratelimit-requests-remaining") == "0"


async def test_request_larger_than_a_limit_never_retries(backend: Backend) -> None:
    """A prompt bigger than the key's TPM can never fit: 429, x-should-retry false."""
    mw = make(EchoApp(), backend, Config(keys=acme(tpm=50)))
    body = {"model": "gpt-5-5", "messages": [{"role": "user", "content": "x" * 400}]}
    r = await post(mw, body, key=KEY)
    assert r.status == 429
    assert r.header("x-should-retry") == "false"
    assert r.header("retry-after") is None
    assert await remaining(mw, Guard.MODEL_RPM, 15_000, "model", "gpt-5-5") == 15_000


async def test_generous_output_cap_is_clamped_to_the_limit(backend: Backend) -> None:
    """max_tokens above the key's TPM reserves the whole budget instead of never fitting."""
    mw = make(EchoApp(payload={"ok": True}), backend, Config(keys=acme(tpm=1000)))
    r = await post(mw, chat(max_tokens=5000), key=KEY)
    assert r.status == 200
    assert r.header("x-ratelimit-remaining-tokens") == "0"
    assert (await post(mw, chat(max_tokens=10), key=KEY)).status == 429


# --- per-key limits and scoping -------------------------------------------------------


async def test_per_key_model_limit_lower_than_the_models(backend: Backend) -> None:
    """A key's own limit on a model binds long before the model's; other models are free."""
    config = Config(keys=acme(rpm=5, model_limits={"gpt-5-5": ModelLimits(rpm=2)}))
    mw = make(EchoApp(), backend, config)
    statuses = [(await post(mw, chat(), key=KEY)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    other_model = await post(mw, chat(model="kimi-latest"), key=KEY)
    assert other_model.status == 200
    assert other_model.header("x-ratelimit-limit-requests") == "5"
    assert other_model.header("x-ratelimit-remaining-requests") == "2"
    assert (await post(mw, chat(), key=OTHER)).status == 200


async def test_model_scoping_403_consumes_nothing(backend: Backend) -> None:
    """A key calling a model outside its scope gets 403 permission_error, nothing taken."""
    mw = make(EchoApp(), backend, Config(keys=acme(models=("gpt-5-5",))))
    r = await post(mw, message(), MESSAGES, KEY)
    assert r.status == 403
    body = r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "permission_error"
    r = await post(mw, chat(model="kimi-latest"), key=KEY)
    assert r.status == 403
    assert r.json()["error"]["type"] == "permission_error"
    assert r.json()["error"]["param"] == "model"
    model = "claude-sonnet-4-7"
    assert await remaining(mw, Guard.MODEL_RPM, 15_000, "model", model) == 15_000
    assert await remaining(mw, Guard.ACCOUNT_RPM, 10_000, "account", "acme") == 10_000
    assert (await post(mw, chat(), key=KEY)).status == 200


# --- refunds --------------------------------------------------------------------------


class InnerRefusal:
    """A governor layer further in that refuses every request."""

    def __init__(self, gov: Governor) -> None:
        self.gov = gov

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = scope["governor.context"]
        await self.gov.refuse(ctx, send, RateLimited("queue full", reason="queue_full"))


async def test_inner_refusal_gives_everything_back(backend: Backend) -> None:
    """A request refused further in consumes no rate budget, and its headers say so."""
    probe = mw = make(EchoApp(), backend)
    mw.app = InnerRefusal(mw.governor)
    r = await post(mw, image(n=2), IMAGES)
    assert r.status == 429
    assert r.header("X-Hypereal-Managed-Model-RPM-Remaining") == "250"
    assert r.header("X-Hypereal-Managed-Image-IPM-Remaining") == "250"
    assert await remaining(probe, Guard.MODEL_RPM, 250, "model", "gpt-image-2") == 250
    assert await remaining(probe, Guard.MODEL_IPM, 250, "model", "gpt-image-2") == 250
    assert await remaining(probe, Guard.MODEL_TPM, 8_000_000, "model", "gpt-image-2") == 8_000_000


async def test_failure_before_the_upstream_gives_everything_back(backend: Backend) -> None:
    """An app that raises before answering leaves every budget whole."""
    mw = make(failing_app, backend)
    with pytest.raises(RuntimeError):
        await post(mw, chat())
    assert await remaining(mw, Guard.MODEL_RPM, 15_000, "model", "gpt-5-5") == 15_000
    assert await remaining(mw, Guard.MODEL_TPM, 40_000_000, "model", "gpt-5-5") == 40_000_000


async def test_upstream_error_keeps_the_request_and_returns_tokens(backend: Backend) -> None:
    """An upstream 500 counts as a request but generated no tokens and no images."""
    mw = make(EchoApp(payload={"error": {"message": "boom"}}, status=500), backend)
    r = await post(mw, image(n=2), IMAGES)
    assert r.status == 500
    model = "gpt-image-2"
    assert await remaining(mw, Guard.MODEL_RPM, 250, "model", model) == 249
    assert await remaining(mw, Guard.MODEL_IPM, 250, "model", model) == 250
    assert await remaining(mw, Guard.MODEL_TPM, 8_000_000, "model", model) == 8_000_000


# --- token settlement -----------------------------------------------------------------

TPM = 40_000_000


async def test_tokens_settle_down_to_usage(backend: Backend) -> None:
    """A reservation larger than the usage is settled down to the usage."""
    usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    mw = make(EchoApp(payload={"usage": usage}), backend)
    r = await post(mw, chat(max_tokens=1000))
    assert r.header("x-ratelimit-remaining-tokens") == str(TPM - reserve(chat(max_tokens=1000)))
    assert await remaining(mw, Guard.MODEL_TPM, TPM, "model", "gpt-5-5") == TPM - 30


async def test_tokens_settle_up_to_usage(backend: Backend) -> None:
    """Usage above the reservation is charged in full (a debt on the window)."""
    usage = {"prompt_tokens": 5000, "completion_tokens": 3000, "total_tokens": 8000}
    mw = make(EchoApp(payload={"usage": usage}), backend, Config(keys=acme(tpm=10_000)))
    assert (await post(mw, chat(max_tokens=10), key=KEY)).status == 200
    assert await remaining(mw, Guard.KEY_TPM, 10_000, "key", _key_id(KEY)) == 2000
    assert await remaining(mw, Guard.MODEL_TPM, TPM, "model", "gpt-5-5") == TPM - 8000
    # What is left no longer fits a request reserving more than 2,000.
    assert (await post(mw, chat(max_tokens=3000), key=KEY)).status == 429


def _key_id(key: str) -> str:
    from governor.keys import key_id

    return key_id(key)


async def test_cache_reads_do_not_count(backend: Backend) -> None:
    """OpenAI cached prompt tokens are not counted toward TPM."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 50,
        "prompt_tokens_details": {"cached_tokens": 900},
    }
    mw = make(EchoApp(payload={"usage": usage}), backend)
    await post(mw, chat())
    assert await remaining(mw, Guard.MODEL_TPM, TPM, "model", "gpt-5-5") == TPM - 150


async def test_anthropic_stream_usage_settles(backend: Backend) -> None:
    """message_start and message_delta usage settle the reservation; cache writes count,
    cache reads do not."""
    events = [
        {
            "type": "message_start",
            "message": {
                "usage": {
                    "input_tokens": 40,
                    "cache_read_input_tokens": 5000,
                    "cache_creation_input_tokens": 60,
                    "output_tokens": 1,
                }
            },
        },
        {"type": "content_block_delta", "delta": {"text": "hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 300}},
    ]
    mw = make(sse_app(events), backend)
    body = message(max_tokens=2000)
    r = await post(mw, {**body, "stream": True}, MESSAGES)
    assert r.status == 200
    model = "claude-sonnet-4-7"
    assert await remaining(mw, Guard.MODEL_TPM, TPM, "model", model) == TPM - 400


async def test_openai_stream_usage_chunk_settles(backend: Backend) -> None:
    """The OpenAI stream's final usage chunk settles the reservation."""
    events = [
        {"choices": [{"delta": {"content": "hi"}}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 8}},
    ]
    mw = make(sse_app(events), backend)
    await post(mw, chat(max_tokens=500, stream=True))
    assert await remaining(mw, Guard.MODEL_TPM, TPM, "model", "gpt-5-5") == TPM - 20


async def test_responses_completed_event_settles(backend: Backend) -> None:
    """response.completed's usage settles a Responses stream."""
    events = [
        {"type": "response.output_text.delta", "delta": "hi"},
        {
            "type": "response.completed",
            "response": {"usage": {"input_tokens": 30, "output_tokens": 70}},
        },
    ]
    mw = make(sse_app(events), backend)
    body = {"model": "gpt-5-5", "input": "hello", "max_output_tokens": 900, "stream": True}
    await post(mw, body, "/v1/managed/responses")
    assert await remaining(mw, Guard.MODEL_TPM, TPM, "model", "gpt-5-5") == TPM - 100


async def test_no_usage_keeps_the_estimate(backend: Backend) -> None:
    """A success that reports no usage keeps its reservation."""
    mw = make(EchoApp(payload={"ok": True}), backend)
    body = chat(max_tokens=700)
    await post(mw, body)
    assert await remaining(mw, Guard.MODEL_TPM, TPM, "model", "gpt-5-5") == TPM - reserve(body)


async def test_default_output_reserve_when_no_cap(backend: Backend) -> None:
    """A request without an output cap reserves the configured default."""
    from governor.config import RateLimitConfig

    config = Config(demo_keys=True, ratelimit=RateLimitConfig(default_output_reserve=1234))
    mw = make(EchoApp(payload={"ok": True}), backend, config)
    body = {"model": "gpt-5-5", "messages": [{"role": "user", "content": "hi"}]}
    r = await post(mw, body)
    from governor.tokens import estimate_input_tokens

    assert r.header("x-ratelimit-remaining-tokens") == str(TPM - estimate_input_tokens(body) - 1234)


async def test_count_tokens_counts_only_as_a_request(backend: Backend) -> None:
    """count_tokens generates nothing: it meets the request guards only."""
    mw = make(EchoApp(), backend)
    body = {"model": "claude-sonnet-4-7", "messages": [{"role": "user", "content": "hi"}]}
    r = await post(mw, body, "/v1/messages/count_tokens")
    assert r.status == 200
    assert r.header("anthropic-ratelimit-requests-remaining") == "9999"
    assert r.header("anthropic-ratelimit-tokens-limit") is None


# --- metrics, stack, pass-through -----------------------------------------------------


async def test_metrics(backend: Backend) -> None:
    """Hits and refusals per guard, tokens reserved and settled."""
    registry = CollectorRegistry()
    usage = {"prompt_tokens": 10, "completion_tokens": 20}
    mw = make(
        EchoApp(payload={"usage": usage}), backend, Config(keys=acme(rpm=1)), registry=registry
    )
    await post(mw, chat(max_tokens=100), key=KEY)
    await post(mw, chat(max_tokens=100), key=KEY)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"governor_ratelimit_{name}_total", labels)

    assert sample("hits", guard="model_rpm", model="gpt-5-5") == 1
    assert sample("hits", guard="key_rpm", model="gpt-5-5") == 1
    assert sample("hits", guard="model_tpm", model="gpt-5-5") == 1
    assert sample("refusals", guard="key_rpm", model="gpt-5-5") == 1
    assert sample("tokens_reserved", model="gpt-5-5") == reserve(chat(max_tokens=100))
    assert sample("tokens_settled", model="gpt-5-5") == 30


async def test_wrap_puts_the_rate_guard_in_the_stack(backend: Backend) -> None:
    """The stack from wrap() answers with the rate headers."""
    gov = Governor(Config(demo_keys=True), backend=backend)
    r = await call(wrap(EchoApp(), gov), path=CHAT, json_body=chat(), headers={"x-api-key": "ck_1"})
    assert r.header("X-Hypereal-Managed-Model-RPM-Remaining") == "14999"


async def test_ungoverned_paths_pass_through(backend: Backend) -> None:
    """Paths without a model (models list, anything else) are not counted."""
    app = EchoApp()
    mw = make(app, backend)
    r = await call(mw, "GET", "/v1/managed/models", headers={"x-api-key": "ck_1"})
    assert r.header("X-Hypereal-Managed-Model-RPM-Remaining") is None
    r = await call(mw, "GET", "/health")
    assert r.status == 200
    assert len(app.calls) == 2


async def test_cancelled_request_keeps_its_hits(backend: Backend) -> None:
    """A cancelled request (the client gone mid-call) is settled: the estimate stands."""
    import asyncio

    gate = Gate(1)
    mw = make(gate, backend)
    task = asyncio.ensure_future(post(mw, chat(max_tokens=100)))
    await asyncio.wait_for(gate.decided.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await remaining(mw, Guard.MODEL_RPM, 15_000, "model", "gpt-5-5") == 14_999
    left = await remaining(mw, Guard.MODEL_TPM, TPM, "model", "gpt-5-5")
    assert left == TPM - reserve(chat(max_tokens=100))
