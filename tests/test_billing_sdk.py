"""Responses carrying billing and insurance still parse in the official SDKs."""

from __future__ import annotations

import anthropic
import httpx2
import openai
import pytest

from governor.backends import MemoryBackend
from governor.billing import ledger_for
from governor.clock import ManualClock
from governor.runtime import Governor
from governor.types import ASGIApp, Receive, Scope, Send
from tests.billing_apps import (
    KEY,
    anthropic_message,
    chat_completion,
    json_app,
    make_governor,
    sse_anthropic_app,
    sse_chat_app,
    stack,
)


@pytest.fixture
def gov(clock: ManualClock) -> Governor:
    return make_governor(MemoryBackend(), clock)


def client(app: ASGIApp) -> httpx2.AsyncClient:
    """Both SDKs (openai 3.x, anthropic 2.x) are built on httpx2, whose ASGITransport
    is httpx's."""
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))


async def test_openai_sdk_parses_billing_and_insurance(gov: Governor, clock: ManualClock) -> None:
    """The OpenAI SDK parses a completion with hypereal metadata; the extra is readable."""
    app = stack(json_app(clock, chat_completion(), work_s=95), gov)
    async with client(app) as http:
        sdk = openai.AsyncOpenAI(base_url="http://gw/v1/managed", api_key=KEY, http_client=http)
        raw = await sdk.chat.completions.with_raw_response.create(
            model="claude-sonnet-4-7",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=1000,
        )
        completion = raw.parse()
    assert completion.choices[0].message.content == "hello"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 500
    extra = completion.model_extra or {}
    assert extra["hypereal"]["billing"]["credits_charged"] == 12
    assert extra["hypereal"]["insurance"]["status"] == "paid"
    assert raw.headers["x-hypereal-insurance-credits"] == "3"


async def test_openai_sdk_stream(gov: Governor, clock: ManualClock) -> None:
    """An OpenAI SDK stream parses and is settled after it ends."""
    app = stack(sse_chat_app(clock, work_s=1), gov)
    async with client(app) as http:
        sdk = openai.AsyncOpenAI(base_url="http://gw/v1/managed", api_key=KEY, http_client=http)
        stream = await sdk.chat.completions.create(
            model="claude-sonnet-4-7",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=1000,
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "t0t1t2"
    assert await ledger_for(gov).balance("acme", 1000) == 988


async def test_openai_sdk_does_not_retry_quota(clock: ManualClock) -> None:
    """A balance refusal reaches the SDK as insufficient_quota and is not retried."""
    gov = make_governor(MemoryBackend(), clock, balance=1)
    attempts: list[int] = []
    inner = stack(json_app(clock, chat_completion()), gov)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        attempts.append(1)
        await inner(scope, receive, send)

    async with client(app) as http:
        sdk = openai.AsyncOpenAI(base_url="http://gw/v1/managed", api_key=KEY, http_client=http)
        with pytest.raises(openai.RateLimitError) as info:
            await sdk.chat.completions.create(
                model="claude-sonnet-4-7", messages=[{"role": "user", "content": "hi"}]
            )
    assert info.value.code == "credit_balance_exhausted"
    assert info.value.type == "insufficient_quota"
    assert len(attempts) == 1


async def test_anthropic_sdk_parses_billing_and_insurance(
    gov: Governor, clock: ManualClock
) -> None:
    """The Anthropic SDK parses a message with hypereal metadata."""
    app = stack(json_app(clock, anthropic_message(), work_s=95), gov)
    async with client(app) as http:
        sdk = anthropic.AsyncAnthropic(base_url="http://gw", api_key=KEY, http_client=http)
        message = await sdk.messages.create(
            model="claude-sonnet-4-7",
            max_tokens=1000,
            messages=[{"role": "user", "content": "hi"}],
        )
    assert message.content[0].type == "text"
    assert message.usage.output_tokens == 500
    extra = message.model_extra or {}
    assert extra["hypereal"]["billing"]["balance_after"] == 988
    assert extra["hypereal"]["insurance"]["credits_compensated"] == 3


async def test_anthropic_sdk_does_not_retry_budget(clock: ManualClock) -> None:
    """A budget refusal reaches the Anthropic SDK as a RateLimitError, once."""
    gov = make_governor(MemoryBackend(), clock, daily_budget=1)
    attempts: list[int] = []
    inner = stack(json_app(clock, anthropic_message()), gov)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        attempts.append(1)
        await inner(scope, receive, send)

    async with client(app) as http:
        sdk = anthropic.AsyncAnthropic(base_url="http://gw", api_key=KEY, http_client=http)
        with pytest.raises(anthropic.RateLimitError):
            await sdk.messages.create(
                model="claude-sonnet-4-7",
                max_tokens=1000,
                messages=[{"role": "user", "content": "hi"}],
            )
    assert len(attempts) == 1


async def test_anthropic_sdk_stream_settles_with_insurance(
    gov: Governor, clock: ManualClock
) -> None:
    """An Anthropic SDK stream parses; it is charged and insured after it ends."""
    app = stack(sse_anthropic_app(clock, work_s=120), gov)
    async with client(app) as http:
        sdk = anthropic.AsyncAnthropic(base_url="http://gw", api_key=KEY, http_client=http)
        async with sdk.messages.stream(
            model="claude-sonnet-4-7",
            max_tokens=1000,
            messages=[{"role": "user", "content": "hi"}],
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
            status = stream.response.headers["x-hypereal-insurance-status"]
    assert text == "hello"
    assert final.usage.output_tokens == 500
    assert status == "pending"
    assert await ledger_for(gov).balance("acme", 1000) == 1000 - 12 + 3
