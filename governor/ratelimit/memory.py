"""Rate counters in this process, on limits' memory storage and strategy."""

from __future__ import annotations

from collections.abc import Sequence

from limits import RateLimitItem, RateLimitItemPerSecond, WindowStats
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from governor.ratelimit import layout
from governor.ratelimit.guards import Adjustment, Decision, Hit, Limit, Window


class MemoryRateStore:
    """limits' sliding window counter in memory, all-or-none by hitting in order and
    refunding what was taken when a later limit refuses.

    *share* divides every limit: the Redis store's fail-open fallback counts a fair
    share of the fleet limit per worker (``limit // share``, at least 1), never the
    whole limit.
    """

    def __init__(self, *, share: int = 1) -> None:
        self.storage = layout.memory_counters()
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self.share = share
        self._scaled: dict[RateLimitItem, RateLimitItem] = {}

    def _item(self, limit: Limit) -> RateLimitItem:
        if self.share == 1:
            return limit.item
        item = self._scaled.get(limit.item)
        if item is None:
            item = RateLimitItemPerSecond(
                max(1, limit.amount // self.share), limit.window, namespace=limit.item.namespace
            )
            self._scaled[limit.item] = item
        return item

    def _key(self, limit: Limit, item: RateLimitItem) -> str:
        return limit.key if item is limit.item else item.key_for(*limit.ids)

    def amount(self, limit: Limit) -> int:
        """The amount this store enforces for *limit* (its share of the fleet limit)."""
        return self._item(limit).amount

    async def acquire(self, hits: Sequence[Hit]) -> Decision:
        # A share never takes more than itself: a request that fits the fleet limit must
        # not become impossible while degraded.
        costs = [min(hit.cost, self._item(hit.limit).amount) for hit in hits]
        taken: list[tuple[Hit, str]] = []
        refused = False
        for hit, cost in zip(hits, costs, strict=True):
            item = self._item(hit.limit)
            if not await self.strategy.hit(item, *hit.limit.ids, cost=cost):
                refused = True
                break
            key = self._key(hit.limit, item)
            taken.append((hit, layout.memory_window_keys(key, item.get_expiry())[1]))
        if refused:
            for (hit, wid), cost in zip(taken, costs, strict=False):
                item = self._item(hit.limit)
                key = self._key(hit.limit, item)
                await layout.memory_adjust(self.storage, key, item.get_expiry(), wid, -cost)
        windows: list[Window] = []
        failing: list[int] = []
        for i, hit in enumerate(hits):
            item = self._item(hit.limit)
            window = await layout.memory_window(
                self.storage, self._key(hit.limit, item), item.get_expiry()
            )
            if refused and not window.fits(item.amount, item.get_expiry(), costs[i]):
                failing.append(i)
            if not refused:
                window.window_id = taken[i][1]
            windows.append(window)
        if refused and not failing:  # freed up meanwhile; still refused, blame the first
            failing.append(len(taken))
        amounts = [self._item(hit.limit).amount for hit in hits]
        return Decision(not refused, windows, amounts, costs, failing)

    async def adjust(self, adjustments: Sequence[Adjustment]) -> None:
        for adj in adjustments:
            item = self._item(adj.limit)
            key = self._key(adj.limit, item)
            await layout.memory_adjust(
                self.storage, key, item.get_expiry(), str(adj.window_id), adj.delta
            )

    async def stats(self, limit: Limit) -> WindowStats:
        return await self.strategy.get_window_stats(self._item(limit), *limit.ids)

    def __repr__(self) -> str:
        return f"MemoryRateStore(share={self.share})"
