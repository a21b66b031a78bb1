"""What governor relies on inside limits (pinned to 5.x), and the adjustment layer."""

from __future__ import annotations

import time

import limits
import pytest
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.crc import key_slot

from governor.backends import RedisBackend
from governor.ratelimit import (
    Adjustment,
    Guard,
    Hit,
    Limit,
    MemoryRateStore,
    RedisRateStore,
    layout,
)
from governor.ratelimit.guards import NAMESPACE

WINDOW = 10_000_000


def limit(amount: int, *ids: str, guard: Guard = Guard.MODEL_RPM) -> Limit:
    return Limit(guard, RateLimitItemPerSecond(amount, WINDOW, namespace=f"{NAMESPACE}/t"), ids)


async def counter(backend: RedisBackend, key: str) -> int:
    value = await backend.redis.get(key)
    assert value is not None
    return int(value)


def test_limits_major_version_is_pinned() -> None:
    """The layout below is limits 5.x's; pyproject pins limits>=5.8,<6."""
    assert limits.__version__.split(".")[0] == "5"


# --- memory ---------------------------------------------------------------------------


async def test_memory_keys_are_limits_keys() -> None:
    """limits' memory strategy writes the counter governor adjusts."""
    storage = MemoryStorage()
    item = RateLimitItemPerSecond(10, WINDOW)
    await SlidingWindowCounterRateLimiter(storage).hit(item, "a", cost=3)
    _, current = layout.memory_window_keys(item.key_for("a"), WINDOW)
    assert await storage.get(current) == 3


async def test_memory_refund_and_debt() -> None:
    """Adjustments move limits' own remaining both ways, never below zero."""
    store = MemoryRateStore()
    lim = limit(100, "m")
    decision = await store.acquire([Hit(lim, 30)])
    wid = decision.windows[0].window_id
    assert wid is not None
    assert (await store.stats(lim)).remaining == 70
    await store.adjust([Adjustment(lim, wid, -20)])
    assert (await store.stats(lim)).remaining == 90
    await store.adjust([Adjustment(lim, wid, 50)])
    assert (await store.stats(lim)).remaining == 40
    await store.adjust([Adjustment(lim, wid, -500)])
    assert (await store.stats(lim)).remaining == 100


async def test_memory_adjust_skips_windows_that_no_longer_weigh() -> None:
    """A counter two windows old is left alone (it weighs nothing any more)."""
    storage = MemoryStorage()
    key = "k"
    stale = f"{key}/{int(time.time() / WINDOW) - 2}"
    assert not await layout.memory_adjust(storage, key, WINDOW, stale, 5)
    assert await storage.get(stale) == 0


async def test_memory_in_order_refund_leaves_nothing() -> None:
    """Hits taken before a later limit refuses are given back."""
    store = MemoryRateStore()
    first, second = limit(10, "a"), limit(1, "b")
    assert (await store.acquire([Hit(second, 1)])).granted
    decision = await store.acquire([Hit(first, 4), Hit(second, 1)])
    assert not decision.granted
    assert decision.refused == [1]
    assert (await store.stats(first)).remaining == 10


async def test_memory_share_divides_limits() -> None:
    """The fail-open fallback enforces limit // share, at least 1."""
    store = MemoryRateStore(share=4)
    lim = limit(10, "s")
    assert store.amount(lim) == 2
    assert store.amount(limit(3, "t")) == 1
    granted = [(await store.acquire([Hit(lim, 1)])).granted for _ in range(3)]
    assert granted == [True, True, False]


# --- Redis ----------------------------------------------------------------------------


async def test_redis_counters_are_limits_counters(redis_backend: RedisBackend) -> None:
    """The admit script writes limits' keys: limits' strategy reads and hits them."""
    store = RedisRateStore(redis_backend)
    lim = limit(5, "model", "x")
    assert (await store.acquire([Hit(lim, 3)])).granted
    assert (await store.stats(lim)).remaining == 2
    strategy = SlidingWindowCounterRateLimiter(store.storage)
    assert await strategy.hit(lim.item, *lim.ids)
    assert await strategy.hit(lim.item, *lim.ids)
    assert not await strategy.hit(lim.item, *lim.ids)
    assert not (await store.acquire([Hit(lim, 1)])).granted
    previous, current = layout.redis_window_keys(store.storage, lim.key)
    assert current == f"{redis_backend.key('rl')}:{{{lim.key}}}"
    assert previous == current + "/-1"
    assert await counter(redis_backend, current) == 5


async def test_redis_all_or_none(redis_backend: RedisBackend) -> None:
    """One script call: a refusal by the last limit writes nothing to the others."""
    store = RedisRateStore(redis_backend)
    big, small = limit(100, "big"), limit(1, "small")
    assert (await store.acquire([Hit(small, 1)])).granted
    decision = await store.acquire([Hit(big, 10), Hit(small, 1)])
    assert not decision.granted
    assert decision.refused == [1]
    assert (await store.stats(big)).remaining == 100
    assert decision.windows[0].current == 0


async def test_redis_refund_and_debt(redis_backend: RedisBackend) -> None:
    """The adjust script moves limits' remaining both ways and clamps at zero."""
    store = RedisRateStore(redis_backend)
    lim = limit(100, "m")
    decision = await store.acquire([Hit(lim, 30)])
    wid = decision.windows[0].window_id
    assert isinstance(wid, int)
    await store.adjust([Adjustment(lim, wid, -20)])
    assert (await store.stats(lim)).remaining == 90
    await store.adjust([Adjustment(lim, wid, 50)])
    assert (await store.stats(lim)).remaining == 40
    await store.adjust([Adjustment(lim, wid, -500)])
    assert (await store.stats(lim)).remaining == 100


async def test_redis_adjust_follows_the_window_after_a_shift(redis_backend: RedisBackend) -> None:
    """A hit whose window became the previous one is adjusted there, not in the new one."""
    store = RedisRateStore(redis_backend)
    lim = limit(100, "shift")
    wid = (await store.acquire([Hit(lim, 40)])).windows[0].window_id
    assert isinstance(wid, int)
    previous, current = layout.redis_window_keys(store.storage, lim.key)
    # End the current window now: a TTL under one window makes the next call shift it.
    await redis_backend.redis.pexpire(current, WINDOW * 1000 - 5_000)
    wid = (await redis_backend.redis.pttl(current)) + int(time.time() * 1000)
    after = await store.acquire([Hit(lim, 1)])
    assert after.granted
    assert await counter(redis_backend, previous) == 40
    await store.adjust([Adjustment(lim, wid, -30)])
    assert await counter(redis_backend, previous) == 10
    assert await counter(redis_backend, current) == 1


async def test_redis_adjust_ignores_unknown_windows(redis_backend: RedisBackend) -> None:
    """A window id matching neither counter (long gone) changes nothing."""
    store = RedisRateStore(redis_backend)
    lim = limit(100, "gone")
    await store.acquire([Hit(lim, 10)])
    await store.adjust([Adjustment(lim, 12345, -10)])
    assert (await store.stats(lim)).remaining == 90


async def test_redis_keys_share_one_cluster_slot(redis_backend: RedisBackend) -> None:
    """Every rate key of a request hashes to one slot, as a multi-key script needs."""
    store = RedisRateStore(redis_backend)
    keys = [
        k
        for ids in (("model", "gpt-5-5"), ("account", "acme"), ("key", "key_1", "model", "m"))
        for k in layout.redis_window_keys(store.storage, limit(5, *ids).key)
    ]
    assert len({key_slot(k.encode()) for k in keys}) == 1


@pytest.mark.parametrize("cost", [1, 7])
async def test_redis_one_round_trip_per_decision(redis_backend: RedisBackend, cost: int) -> None:
    """Acquire is one script call whatever the number of limits and the cost."""
    store = RedisRateStore(redis_backend)
    calls = 0
    run = redis_backend.run

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return await run(*args, **kwargs)  # type: ignore[arg-type]

    redis_backend.run = counting  # type: ignore[method-assign]
    hits = [Hit(limit(100, f"l{i}"), cost) for i in range(8)]
    decision = await store.acquire(hits)
    adjustments = [
        Adjustment(h.limit, w.window_id or 0, -1)
        for h, w in zip(hits, decision.windows, strict=True)
    ]
    await store.adjust(adjustments)
    assert calls == 2


async def test_memory_sweep_runs_at_most_once_a_second() -> None:
    """limits' sweep of every counter is started once a second, not after every write."""
    assert hasattr(MemoryStorage, "_MemoryStorage__schedule_expiry")
    storage = layout.memory_counters()
    await storage.incr("a", 10)
    first = storage.timer
    assert first is not None
    await first
    await storage.incr("b", 10)
    assert storage.timer is first
    assert await storage.get("a") == 1


async def test_memory_store_and_limits_strategy_share_counters() -> None:
    """The synchronous store and limits' own strategy count in the same counters."""
    store = MemoryRateStore()
    lim = limit(5, "shared")
    assert (await store.acquire([Hit(lim, 3)])).granted
    assert await store.strategy.hit(lim.item, *lim.ids)
    assert await store.strategy.hit(lim.item, *lim.ids)
    assert not await store.strategy.hit(lim.item, *lim.ids)
    assert not (await store.acquire([Hit(lim, 1)])).granted


async def test_memory_limit_met_twice_counts_both_hits() -> None:
    """A limit met twice by one request is checked with both hits, and refused whole."""
    store = MemoryRateStore()
    lim = limit(5, "twice")
    decision = await store.acquire([Hit(lim, 3), Hit(lim, 3)])
    assert not decision.granted
    assert decision.refused == [1]
    assert (await store.stats(lim)).remaining == 5
    decision = await store.acquire([Hit(lim, 2), Hit(lim, 3)])
    assert decision.granted
    assert [w.current for w in decision.windows] == [5, 5]
    assert (await store.stats(lim)).remaining == 0


async def test_memory_counters_read_as_limits_reads() -> None:
    """MemoryCounters reads the keys, counts and TTLs limits' get_sliding_window reports."""
    counters = layout.MemoryCounters()
    item = RateLimitItemPerSecond(10, WINDOW)
    await SlidingWindowCounterRateLimiter(counters.storage).hit(item, "r", cost=4)
    key = item.key_for("r")
    previous_key, current_key = layout.memory_window_keys(key, WINDOW)
    await counters.storage.incr(previous_key, 2 * WINDOW, 3)
    prev, prev_ttl, cur, cur_ttl = await counters.storage.get_sliding_window(key, WINDOW)
    wid, window = counters.window(key, counters.frame(WINDOW, time.time()))
    assert wid == current_key
    assert (window.previous, window.current) == (prev, cur) == (3, 4)
    assert abs(window.previous_ttl - prev_ttl) < 1
    assert abs(window.current_ttl - cur_ttl) < 1
