"""Redis down: fail open to a fair local share, or fail closed with 503/529."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from governor.backends import RedisBackend
from governor.backends.redis import make_client
from governor.config import Config, KeyEntry, ModelEntry, RateLimitConfig, RedisConfig
from governor.context import get_context
from governor.ratelimit import Decision, Hit
from governor.types import Receive, Scope, Send
from tests.apps import EchoApp
from tests.ratelimit_support import MESSAGES, chat, make, message, post

DEAD = RedisConfig(url="redis://127.0.0.1:1/0", retries=0, key_prefix="gov-dead")


@pytest.fixture
async def dead_backend() -> AsyncIterator[RedisBackend]:
    """A Redis backend whose server refuses every connection."""
    client = make_client(DEAD)
    async with RedisBackend(DEAD, client=client) as backend:
        yield backend
    await client.aclose()


class Notes:
    """Records the degraded note of each request."""

    def __init__(self) -> None:
        self.inner = EchoApp()
        self.degraded: list[bool] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        assert ctx is not None
        self.degraded.append(bool(ctx.notes.get("degraded")))
        await self.inner(scope, receive, send)


async def test_fail_open_admits_a_fair_share(dead_backend: RedisBackend) -> None:
    """Open: a local limiter at limit // fallback_workers, marked degraded."""
    config = Config(
        demo_keys=True,
        models={"gpt-5-5": ModelEntry(rpm=8)},
        ratelimit=RateLimitConfig(fail_mode="open", fallback_workers=4),
    )
    app = Notes()
    mw = make(app, dead_backend, config)
    results = [await post(mw, chat()) for _ in range(3)]
    assert [r.status for r in results] == [200, 200, 429]
    assert all(r.header("X-Hypereal-Managed-Degraded") == "ratelimit" for r in results)
    assert results[0].header("X-Hypereal-Managed-Model-RPM-Limit") == "2"
    assert results[0].header("X-Hypereal-Managed-Model-RPM-Remaining") == "1"
    assert app.degraded == [True, True]


async def test_fail_open_retries_redis_after_a_pause(dead_backend: RedisBackend) -> None:
    """After a failure the store is skipped for a moment, then tried again."""
    config = Config(demo_keys=True, ratelimit=RateLimitConfig(fail_mode="open"))
    mw = make(EchoApp(), dead_backend, config)
    calls = 0
    acquire = mw.store.acquire

    async def counting(hits: Sequence[Hit]) -> Decision:
        nonlocal calls
        calls += 1
        return await acquire(hits)

    mw.store.acquire = counting  # type: ignore[method-assign]
    await post(mw, chat())
    await post(mw, chat())
    assert calls == 1
    mw.governor.clock.advance(1.5)  # type: ignore[attr-defined]
    await post(mw, chat())
    assert calls == 2


@pytest.mark.parametrize(
    ("path", "body", "status"), [("chat", chat(), 503), (MESSAGES, message(), 529)]
)
async def test_fail_closed_refuses(
    dead_backend: RedisBackend, path: str, body: dict[str, object], status: int
) -> None:
    """Closed: nothing is admitted without the shared counters (503, 529 on Anthropic)."""
    config = Config(demo_keys=True, ratelimit=RateLimitConfig(fail_mode="closed"))
    app = EchoApp()
    mw = make(app, dead_backend, config)
    r = await post(mw, body, MESSAGES if path == MESSAGES else "/v1/managed/chat/completions")
    assert r.status == status
    assert r.header("X-Hypereal-Managed-Degraded") == "ratelimit"
    assert r.header("x-should-retry") == "true"
    assert r.header("retry-after") == "1"
    assert app.calls == []


async def test_fail_open_share_never_makes_a_request_impossible(
    dead_backend: RedisBackend,
) -> None:
    """A reservation above the local share takes the whole share instead of never fitting."""
    config = Config(
        keys={"k": KeyEntry(account="acme", key="sk-1", tpm=1000)},
        ratelimit=RateLimitConfig(fail_mode="open", fallback_workers=4),
    )
    mw = make(EchoApp(payload={"ok": True}), dead_backend, config)
    first = await post(mw, chat(max_tokens=600), key="sk-1")
    assert first.status == 200
    assert first.header("x-ratelimit-limit-tokens") == "250"
    assert first.header("x-ratelimit-remaining-tokens") == "0"
    assert (await post(mw, chat(max_tokens=10), key="sk-1")).status == 429
