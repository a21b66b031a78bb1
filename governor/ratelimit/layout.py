"""Everything governor relies on inside `limits`, in one place.

limits has no refund or adjustment API and no multi-limit atomicity, so governor
works on limits' storage directly: the sliding-window-counter key layout of the
memory and Redis storages, and the memory storage's counters. These are internals of
limits 5.x (pinned ``limits>=5.8,<6`` in pyproject.toml); tests/test_ratelimit_layout.py
checks each assumption against the installed version, so an upgrade that changes
them fails there first.

Memory storage (``limits.aio.storage.MemoryStorage``): window counters are keyed
``<key>/<int(now / window)>``, aligned on the epoch; the current window's counter lives
two windows. Redis storage (``limits.aio.storage.RedisStorage``): the current window
is ``<prefix>:{<key>}`` and the previous ``<prefix>:{<key>}/-1``; windows start at the
first hit, the current counter is created with a TTL of two windows and, once its TTL
falls below one window, renamed to the previous key (keeping its TTL) and replaced.
A Redis window is therefore identified by its absolute expiry time, which the rename
keeps. Memory storage also schedules a sweep of every counter after every write (a task
that walks all of them): :func:`memory_counters` sweeps at most once a second instead.
"""

from __future__ import annotations

import time

from limits.aio.storage import MemoryStorage, RedisStorage

from governor.ratelimit.guards import Window

SWEEP_INTERVAL_S = 1.0


def memory_counters() -> MemoryStorage:
    """limits' memory storage, sweeping expired counters at most once a second.

    limits starts a task walking every counter after each write, which makes a write
    O(counters): 350 us a request with 2,000 keys. Expired counters are also dropped
    when read (``get``), so the sweep only reclaims memory and need not run that often.
    (Patched on the instance: a subclass would get limits' error wrappers twice.)
    """
    storage = MemoryStorage()
    sweep = storage._MemoryStorage__schedule_expiry  # type: ignore[attr-defined]
    next_sweep = 0.0

    async def schedule_expiry() -> None:
        nonlocal next_sweep
        now = time.monotonic()
        if now >= next_sweep:
            next_sweep = now + SWEEP_INTERVAL_S
            await sweep()

    storage._MemoryStorage__schedule_expiry = schedule_expiry  # type: ignore[attr-defined]
    return storage


def memory_window_keys(key: str, window: int, now: float | None = None) -> tuple[str, str]:
    """(previous, current) counter keys of *key* in limits' memory storage."""
    return MemoryStorage.sliding_window_keys(key, window, time.time() if now is None else now)


async def memory_window(storage: MemoryStorage, key: str, window: int) -> Window:
    """The sliding window of *key*, read the way limits' strategy reads it."""
    prev, prev_ttl, cur, cur_ttl = await storage.get_sliding_window(key, window)
    return Window(prev, prev_ttl, cur, cur_ttl)


async def memory_adjust(
    storage: MemoryStorage, key: str, window: int, wid: str, delta: int
) -> bool:
    """Add *delta* to the counter *wid* of *key* if it is still the current or previous
    window (older counters no longer weigh anything). Never below zero."""
    if delta == 0 or wid not in memory_window_keys(key, window):
        return False
    if delta < 0:
        await storage.decr(wid, -delta)
    else:
        await storage.incr(wid, 2 * window, delta)
    return True


def redis_window_keys(storage: RedisStorage, key: str) -> tuple[str, str]:
    """(previous, current) full Redis keys of *key* in limits' Redis storage."""
    bridge = storage.bridge
    return (
        bridge.prefixed_key(storage._previous_window_key(key)),
        bridge.prefixed_key(storage._current_window_key(key)),
    )


def redis_storage(pool: object, prefix: str) -> RedisStorage:
    """limits' redis-py storage on an existing connection pool (one pool for governor).

    limits wants a URI even with a pool; it only parses it (for credentials, unused when
    a pool is given), so a placeholder does.
    """
    return RedisStorage(
        "async+redis://shared-pool:6379",
        implementation="redispy",
        key_prefix=prefix,
        connection_pool=pool,  # type: ignore[arg-type]
    )
