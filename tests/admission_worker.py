"""A worker process for the several-process admission tests (run with ``python -m``).

``stress URL PREFIX LIMIT N``: wait for the go signal, run N concurrent acquires of one
pool, count holders in a shared Redis counter, print the peak it saw as JSON.
``hold URL PREFIX LIMIT TTL``: take LIMIT slots, print ``held``, and hang (to be killed).
"""

from __future__ import annotations

import asyncio
import json
import sys

from redis.asyncio import Redis

from governor.admission import Lease, Pool, QueueLimits
from governor.admission.redis import RedisSlots
from governor.backends import RedisBackend
from governor.config import RedisConfig

MODEL = "gpt-5-5"


def _slots(url: str, prefix: str, ttl: float) -> tuple[RedisBackend, RedisSlots]:
    backend = RedisBackend(RedisConfig(url=url, key_prefix=prefix, socket_timeout_s=2.0))
    limits = QueueLimits(max_waiters=100_000, max_waiters_per_account=100_000)
    slots = RedisSlots(backend, limits, lease_ttl_s=ttl, heartbeat_s=ttl / 4, poll_s=0.05)
    return backend, slots


async def stress(url: str, prefix: str, limit: int, n: int) -> None:
    backend, slots = _slots(url, prefix, 10.0)
    control = Redis.from_url(url)
    pool = Pool(MODEL, limit)
    counter = backend.key("test", "inside")

    async def one(i: int) -> int:
        result = await slots.admit(pool, f"acct{i % 3}", 100)
        lease = result if isinstance(result, Lease) else await result.wait()
        inside = int(await control.incr(counter))
        await asyncio.sleep(0.002)  # the "upstream call"
        await control.decr(counter)
        await slots.release(lease, 0.002)
        return inside

    print("ready", flush=True)
    await control.blpop([backend.key("test", "go")], timeout=30)
    peaks = await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps({"peak": max(peaks), "done": len(peaks)}), flush=True)
    await slots.aclose()
    await control.aclose()
    await backend.aclose()


async def hold(url: str, prefix: str, limit: int, ttl: float) -> None:
    _, slots = _slots(url, prefix, ttl)
    pool = Pool(MODEL, limit)
    for i in range(limit):
        lease = await slots.admit(pool, f"acct{i}", 1)
        if not isinstance(lease, Lease):
            raise SystemExit("expected a free slot")
    print("held", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    mode, url, prefix, limit, extra = sys.argv[1:6]
    if mode == "stress":
        asyncio.run(stress(url, prefix, int(limit), int(extra)))
    else:
        asyncio.run(hold(url, prefix, int(limit), float(extra)))
