"""Rate counters in this process, in limits' memory storage."""

from __future__ import annotations

import time
from collections.abc import Sequence

from limits import RateLimitItem, RateLimitItemPerSecond, WindowStats
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from governor.ratelimit import layout
from governor.ratelimit.guards import Adjustment, Decision, Hit, Limit, Window

# Bound on the per-limit cache (limits come and go with API keys and accounts).
_MAX_LIMITS = 100_000


class MemoryRateStore:
    """limits' sliding window counters in memory, taken all or none.

    The counters are limits' own (its ``MemoryStorage``, so limits' strategy reads them:
    :meth:`stats`), but a decision does not go through limits' async ``hit()`` one limit
    at a time: :meth:`acquire` checks every window, then commits all of them or none,
    synchronously on the storage's dicts (:class:`~governor.ratelimit.layout.MemoryCounters`,
    limits' own arithmetic). No await inside means nothing else runs on the event loop
    meanwhile, so the decision is atomic in this process without a lock, and it costs a
    few dict operations instead of a dozen awaited, error-wrapped storage calls. The
    windows read for the decision are the ones reported in the headers.

    *share* divides every limit: the Redis store's fail-open fallback counts a fair
    share of the fleet limit per worker (``limit // share``, at least 1), never the
    whole limit.
    """

    def __init__(self, *, share: int = 1) -> None:
        self.counters = layout.MemoryCounters()
        self.storage = self.counters.storage
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self.share = share
        self._scaled: dict[RateLimitItem, RateLimitItem] = {}
        # limit.key -> (enforced amount, window, storage key)
        self._resolved: dict[str, tuple[int, int, str]] = {}

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

    def _resolve(self, limit: Limit) -> tuple[int, int, str]:
        """The amount enforced for *limit*, its window and its key in the storage."""
        resolved = self._resolved.get(limit.key)
        if resolved is None:
            item = self._item(limit)
            key = limit.key if item is limit.item else item.key_for(*limit.ids)
            resolved = (item.amount, item.get_expiry(), key)
            if len(self._resolved) >= _MAX_LIMITS:
                self._resolved.clear()
            self._resolved[limit.key] = resolved
        return resolved

    def amount(self, limit: Limit) -> int:
        """The amount this store enforces for *limit* (its share of the fleet limit)."""
        return self._resolve(limit)[0]

    async def acquire(self, hits: Sequence[Hit]) -> Decision:
        # Synchronous on purpose (see the class docstring): no await between the checks
        # and the commit.
        return self.decide(hits)

    def decide(self, hits: Sequence[Hit]) -> Decision:
        """:meth:`acquire` without the coroutine: check every window, then commit all."""
        now = time.time()
        counters = self.counters
        amounts: list[int] = []
        costs: list[int] = []
        spans: list[int] = []
        windows: list[Window] = []
        wids: list[str] = []
        # What earlier hits of this request take from the same counter (a limit met
        # twice): each hit is checked as if the earlier ones had been taken.
        pending: dict[str, int] = {}
        first_refused = -1
        for i, hit in enumerate(hits):
            amount, window, key = self._resolve(hit.limit)
            # A share never takes more than itself: a request that fits the fleet limit
            # must not become impossible while degraded.
            cost = min(hit.cost, amount)
            wid, state = counters.window(key, window, now)
            if first_refused < 0:
                taken = pending.get(wid, 0)
                # limits' test: floor(previous * previous_ttl / window + current) + cost.
                if cost > amount or state.count(window) + taken + cost > amount:
                    first_refused = i
                else:
                    pending[wid] = taken + cost
            amounts.append(amount)
            costs.append(cost)
            spans.append(window)
            windows.append(state)
            wids.append(wid)
        if first_refused >= 0:
            # Nothing was taken; each window reports its state without this request.
            refused = [
                i
                for i, (state, amount, window, cost) in enumerate(
                    zip(windows, amounts, spans, costs, strict=True)
                )
                if not state.fits(amount, window, cost)
            ]
            return Decision(False, windows, amounts, costs, refused or [first_refused])
        for wid, window, cost in zip(wids, spans, costs, strict=True):
            counters.incr(wid, 2 * window, cost, now)
        count = counters.counts
        for state, wid in zip(windows, wids, strict=True):
            state.current = count[wid]
            state.window_id = wid
        return Decision(True, windows, amounts, costs)

    async def adjust(self, adjustments: Sequence[Adjustment]) -> None:
        now = time.time()
        for adj in adjustments:
            _, window, key = self._resolve(adj.limit)
            self.counters.adjust(key, window, str(adj.window_id), adj.delta, now)

    async def stats(self, limit: Limit) -> WindowStats:
        return await self.strategy.get_window_stats(self._item(limit), *limit.ids)

    def __repr__(self) -> str:
        return f"MemoryRateStore(share={self.share})"
