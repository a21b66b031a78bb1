"""One worker process of the multi-process billing test.

``python -m tests.billing_worker <redis url> <prefix> <requests> <processes> <limit>...``
waits for all *processes* on a Redis barrier, then sends, for each *limit*, *requests*
concurrent chat requests through billing on a RedisBackend
under ``<prefix>-<limit>`` (the upstream reports no usage, so each admitted request is
charged exactly its 16-credit reservation) and prints the statuses per limit as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys

from governor.backends import RedisBackend
from governor.clock import ManualClock
from governor.config import RedisConfig
from tests.billing_apps import KEY, chat_body, chat_completion, json_app, make_governor, stack
from tests.helpers import call


async def barrier(backend: RedisBackend, parties: int) -> None:
    """Wait until every worker process is here, so their bursts overlap."""
    key = backend.key("barrier")
    await backend.redis.incr(key)
    await backend.redis.expire(key, 60)
    for _ in range(30_000):
        if int(await backend.redis.get(key) or 0) >= parties:
            return
        await asyncio.sleep(0.001)
    raise RuntimeError("the other workers never arrived")


async def main(url: str, prefix: str, limit: str, requests: int, parties: int) -> list[int]:
    clock = ManualClock()
    async with RedisBackend(RedisConfig(url=url, key_prefix=prefix, max_connections=200)) as b:
        kwargs = {"balance": 200} if limit == "balance" else {"balance": 10**9, limit: 200}
        gov = make_governor(b, clock, **kwargs)  # type: ignore[arg-type]
        app = stack(json_app(clock, chat_completion(usage=None)), gov)
        await barrier(b, parties)
        results = await asyncio.gather(
            *(
                call(app, headers={"authorization": f"Bearer {KEY}"}, json_body=chat_body())
                for _ in range(requests)
            )
        )
        return [r.status for r in results]


async def run_all(
    url: str, prefix: str, requests: int, parties: int, limits: list[str]
) -> dict[str, list[int]]:
    return {
        limit: await main(url, f"{prefix}-{limit}", limit, requests, parties) for limit in limits
    }


if __name__ == "__main__":
    url, prefix, requests, parties, *limits = sys.argv[1:]
    print(json.dumps(asyncio.run(run_all(url, prefix, int(requests), int(parties), limits))))
