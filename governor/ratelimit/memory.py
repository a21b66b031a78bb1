"""Rate counters in this process, in limits' memory storage."""

from __future__ import annotations

import time
from collections.abc import Sequence
from math import floor

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
        resolved = self._resolved
        wids: list[str] = []
        amounts: list[int] = []
        costs: list[int] = []
        windows: list[Window] = []
        # What this request takes from each counter, with the counter's window. A limit
        # met twice is checked as if its earlier hits had been taken, as hitting the
        # limits one after the other would.
        takes: dict[str, tuple[int, int]] = {}
        first_refused = -1
        frame_span = 0
        frame: layout.Frame | None = None
        for hit in hits:
            limit = hit.limit
            amount, span, key = resolved.get(limit.key) or self._resolve(limit)
            # A share never takes more than itself: a request that fits the fleet limit
            # must not become impossible while degraded. (So limits' "cost > amount
            # never fits" cannot happen here.)
            cost = hit.cost
            if cost > amount:
                cost = amount
            if span != frame_span or frame is None:
                frame = counters.frame(span, now)
                frame_span = span
            wid, window = counters.window(key, frame)
            if first_refused < 0:
                taken = takes[wid][0] + cost if wid in takes else cost
                # limits' test: floor(previous * previous_ttl / window + current) + cost.
                used = window.current + taken
                if window.previous:
                    used += floor(window.previous * window.previous_ttl / span)
                if used > amount:
                    first_refused = len(windows)
                else:
                    takes[wid] = (taken, span)
            wids.append(wid)
            amounts.append(amount)
            costs.append(cost)
            windows.append(window)
        if first_refused >= 0:
            # Nothing was taken; each window reports its state without this request.
            for window in windows:
                window.window_id = None
            refused = [
                i
                for i, (window, amount, hit, cost) in enumerate(
                    zip(windows, amounts, hits, costs, strict=True)
                )
                if not window.fits(amount, hit.limit.window, cost)
            ]
            return Decision(False, windows, amounts, costs, refused or [first_refused])
        counters.commit(takes, now)
        counts = counters.counts
        for wid, window in zip(wids, windows, strict=True):
            window.current = counts[wid]
        return Decision(True, windows, amounts, costs)

    async def adjust(self, adjustments: Sequence[Adjustment]) -> None:
        now = time.time()
        resolved = self._resolved
        adjust = self.counters.adjust
        for adj in adjustments:
            limit = adj.limit
            _, window, key = resolved.get(limit.key) or self._resolve(limit)
            adjust(key, window, str(adj.window_id), adj.delta, now)

    async def stats(self, limit: Limit) -> WindowStats:
        return await self.strategy.get_window_stats(self._item(limit), *limit.ids)

    def __repr__(self) -> str:
        return f"MemoryRateStore(share={self.share})"
