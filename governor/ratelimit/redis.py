"""Rate counters in Redis, shared by every worker: one script call per decision.

The counters are limits' own (its Redis storage's sliding-window-counter keys, on
governor's shared connection pool), so limits' strategy reads them as its own
(:meth:`RedisRateStore.stats`); the decision itself is one Lua script over every limit
of the request (``admit.lua``: check all, then commit all), not one ``hit()`` round
trip per limit, and settlement is one more (``adjust.lua``), which limits has no API for.
"""

from __future__ import annotations

from collections.abc import Sequence

from limits import WindowStats
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from governor.backends import RedisBackend, map_redis_errors
from governor.ratelimit import layout
from governor.ratelimit.guards import Adjustment, Decision, Hit, Limit, Window


class RedisRateStore:
    """limits' sliding window counters in Redis, taken all-or-none by one script."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self.storage = layout.redis_storage(backend.redis.connection_pool, backend.key("rl"))
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self._admit = backend.script(__package__, "admit.lua")
        self._adjust = backend.script(__package__, "adjust.lua")
        self._keys: dict[str, tuple[str, str]] = {}

    def _window_keys(self, key: str) -> tuple[str, str]:
        keys = self._keys.get(key)
        if keys is None:
            keys = layout.redis_window_keys(self.storage, key)
            if len(self._keys) < 100_000:  # bounded: keys and accounts come and go
                self._keys[key] = keys
        return keys

    async def acquire(self, hits: Sequence[Hit]) -> Decision:
        keys: list[str] = []
        args: list[int] = []
        for hit in hits:
            keys.extend(self._window_keys(hit.limit.key))
            args.extend((hit.limit.amount, hit.limit.window, hit.cost))
        raw = await self.backend.run(self._admit, keys, args)
        granted = int(raw[0]) == 1
        now = int(raw[1])
        windows: list[Window] = []
        refused: list[int] = []
        for i in range(len(hits)):
            prev, prev_ttl, cur, cur_ttl, fits = (int(v) for v in raw[2 + 5 * i : 7 + 5 * i])
            window = Window(prev, prev_ttl / 1000, cur, cur_ttl / 1000)
            if granted:
                window.window_id = now + cur_ttl
            elif not fits:
                refused.append(i)
            windows.append(window)
        amounts = [h.limit.amount for h in hits]
        return Decision(granted, windows, amounts, [h.cost for h in hits], refused)

    async def adjust(self, adjustments: Sequence[Adjustment]) -> None:
        keys: list[str] = []
        args: list[int] = []
        for adj in adjustments:
            if adj.delta:
                keys.extend(self._window_keys(adj.limit.key))
                args.extend((int(adj.window_id), adj.delta))
        if keys:
            await self.backend.run(self._adjust, keys, args)

    async def stats(self, limit: Limit) -> WindowStats:
        with map_redis_errors("ratelimit stats"):
            return await self.strategy.get_window_stats(limit.item, *limit.ids)
