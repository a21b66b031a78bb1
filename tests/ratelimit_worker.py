"""A worker process for the multi-process rate-guard test (importable under spawn)."""

from __future__ import annotations

import asyncio
from typing import Any

from governor import Governor
from governor.config import Config, ModelEntry, RedisConfig
from governor.ratelimit import RateGuardMiddleware
from tests.apps import EchoApp
from tests.helpers import auth, call

BODY = {"model": "gpt-5-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


async def hammer(url: str, prefix: str, model: ModelEntry, n: int, barrier: Any) -> int:
    """Send *n* concurrent requests through a rate guard on the shared Redis; count 200s."""
    config = Config(
        demo_keys=True,
        backend="redis",
        redis=RedisConfig(url=url, key_prefix=prefix),
        models={"gpt-5-5": model},
    )
    async with Governor(config) as gov:
        app = RateGuardMiddleware(EchoApp(payload={"ok": True}), governor=gov, window_s=10_000_000)
        # Open the pool's connections first, so that every process starts hammering at
        # once when the barrier lets them go.
        redis = gov.backend.redis
        await asyncio.gather(*(redis.ping() for _ in range(min(n, 60))))
        await asyncio.to_thread(barrier.wait)
        results = await asyncio.gather(
            *(call(app, json_body=BODY, headers=auth("ck_shared")) for _ in range(n))
        )
    return sum(r.status == 200 for r in results)


def run(url: str, prefix: str, model: ModelEntry, n: int, barrier: Any, out: Any) -> None:
    out.put(asyncio.run(hammer(url, prefix, model, n, barrier)))
