"""Everything governor relies on inside `limits`, in one place.

limits has no refund or adjustment API and no multi-limit atomicity, so governor
works on limits' storage directly: the sliding-window-counter key layout of the
memory and Redis storages, and the memory storage's counters. These are internals of
limits 5.x (pinned ``limits>=5.8,<6`` in pyproject.toml); tests/test_ratelimit_layout.py
checks each assumption against the installed version, so an upgrade that changes
them fails there first.

Memory storage (``limits.aio.storage.MemoryStorage``): window counters are keyed
``<key>/<int(now / window)>``, aligned on the epoch, in a ``Counter`` (``storage``)
with their absolute expiry times in ``expirations``; a counter is created with an
expiry of two windows and an expired one reads as zero (and is dropped). The weighted
count is ``previous * previous_ttl / window + current`` with ``previous_ttl`` the time
left in the current window (zero when there is no previous count).
:class:`MemoryCounters` reads and writes those dicts synchronously, exactly as limits'
``get``/``incr``/``decr``/``get_sliding_window`` do, so that limits' own strategy reads
the same counts. Redis storage (``limits.aio.storage.RedisStorage``): the current window
is ``<prefix>:{<key>}`` and the previous ``<prefix>:{<key>}/-1``; windows start at the
first hit, the current counter is created with a TTL of two windows and, once its TTL
falls below one window, renamed to the previous key (keeping its TTL) and replaced.
A Redis window is therefore identified by its absolute expiry time, which the rename
keeps. Memory storage also schedules a sweep of every counter after every write (a task
that walks all of them): :class:`MemoryCounters` sweeps at most once a second instead,
for limits' own writes and for its own.
"""

from __future__ import annotations

import asyncio
import time

from limits.aio.storage import MemoryStorage, RedisStorage

from governor.ratelimit.guards import Window

SWEEP_INTERVAL_S = 1.0


# (now, window, previous window number, current window number, previous_ttl, current_ttl)
Frame = tuple[float, int, int, int, float, float]

# Bound on the window-key cache (limit keys come and go with API keys and accounts).
_MAX_KEYS = 100_000


class MemoryCounters:
    """limits' memory storage, read and written synchronously by the rate store.

    limits' async storage costs an awaited, error-wrapped call per read and write (a
    three-limit request took some 30 us in them) and takes one limit at a time. These
    methods do what limits' ``get``, ``incr``, ``decr`` and ``get_sliding_window`` do,
    on the same dicts and with the same arithmetic, but without awaiting: a caller that
    checks and commits several windows between two awaits is atomic in this process
    (nothing else runs on the event loop meanwhile), and limits' strategy on
    :attr:`storage` still reads and writes the same counts.

    limits starts a task walking every counter after each write, which makes a write
    O(counters): 350 us a request with 2,000 keys. Expired counters are also dropped
    when read, so the sweep only reclaims memory: it runs at most once a second, for
    limits' own writes (patched on the instance: a subclass would get limits' error
    wrappers twice) and for these.
    """

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        self.counts = self.storage.storage
        self.expirations = self.storage.expirations
        self._locks = self.storage.locks
        self._expire_events = self.storage._MemoryStorage__expire_events  # type: ignore[attr-defined]
        self._next_sweep = 0.0
        self._keys: dict[str, tuple[int, int, str, str]] = {}

        async def schedule_expiry() -> None:
            self.sweep()

        self.storage._MemoryStorage__schedule_expiry = schedule_expiry  # type: ignore[attr-defined]

    def sweep(self) -> None:
        """Start limits' sweep of expired counters, at most once a second (needs a loop)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        storage = self.storage
        if not storage.timer or storage.timer.done():
            storage.timer = asyncio.create_task(self._expire_events())

    def _window_keys(self, key: str, window: int, now: float) -> tuple[int, int, str, str]:
        # limits' sliding_window_keys, its strings kept while the window lasts.
        previous = int((now - window) / window)
        current = int(now / window)
        cached = self._keys.get(key)
        if cached is not None and cached[1] == current and cached[0] == previous:
            return cached
        cached = (previous, current, f"{key}/{previous}", f"{key}/{current}")
        if len(self._keys) >= _MAX_KEYS:
            self._keys.clear()
        self._keys[key] = cached
        return cached

    def get(self, key: str, now: float) -> int:
        """limits' ``get``: the count, dropping the counter if it has expired."""
        if self.expirations.get(key, 0.0) > now:
            return self.counts.get(key, 0)
        self.counts.pop(key, None)
        self.expirations.pop(key, None)
        self._locks.pop(key, None)
        return 0

    def incr(self, key: str, expiry: float, amount: int, now: float) -> int:
        """limits' ``incr``: a counter starting from zero lives *expiry* seconds."""
        self.get(key, now)
        self.sweep()
        counts = self.counts
        counts[key] += amount
        value = counts[key]
        if value == amount:
            self.expirations[key] = now + expiry
        return value

    def decr(self, key: str, amount: int, now: float) -> int:
        """limits' ``decr``: never below zero, the expiry unchanged."""
        value = max(self.get(key, now) - amount, 0)
        self.sweep()
        self.counts[key] = value
        return value

    def frame(self, window: int, now: float) -> Frame:
        """What every counter of *window* seconds shares at *now*: the window numbers and
        the TTLs limits' ``get_sliding_window`` reports."""
        # x % 1 is x - int(x) for x >= 0, exactly (the fraction of a float is exact).
        previous_at = (now - window) / window
        current_at = now / window
        previous = int(previous_at)
        current = int(current_at)
        previous_part = previous_at - previous if previous_at >= 0 else previous_at % 1
        return (
            now,
            window,
            previous,
            current,
            (1 - previous_part) * window,
            (1 - (current_at - current)) * window + window,
        )

    def window(self, key: str, frame: Frame) -> tuple[str, Window]:
        """The current counter's key and the sliding window of *key* in *frame*, as
        limits' ``get_sliding_window`` reads it (``get`` inlined: this runs for every
        limit of every request), its ``window_id`` that current counter's key."""
        now, window, previous_n, current_n, previous_ttl, current_ttl = frame
        keys = self._keys.get(key)
        if keys is None or keys[1] != current_n or keys[0] != previous_n:
            keys = self._window_keys(key, window, now)
        _, _, previous_key, current_key = keys
        expirations = self.expirations
        counts = self.counts
        # limits' get: live counters read, expired ones dropped, missing ones are zero.
        expires = expirations.get(previous_key)
        if expires is not None and expires > now:
            previous = counts[previous_key]
        elif expires is None and previous_key not in counts:
            previous = 0
        else:
            previous = self.get(previous_key, now)
        expires = expirations.get(current_key)
        if expires is not None and expires > now:
            current = counts[current_key]
        elif expires is None and current_key not in counts:
            current = 0
        else:
            current = self.get(current_key, now)
        return current_key, Window(
            previous, previous_ttl if previous else 0.0, current, current_ttl, current_key
        )

    def commit(self, takes: dict[str, tuple[int, int]], now: float) -> None:
        """limits' ``incr`` of each current counter by what is taken from it, counters
        :meth:`window` has just read at *now* (so an expired one is already dropped):
        *takes* maps a counter key to (amount, window)."""
        counts = self.counts
        expirations = self.expirations
        for key, (amount, window) in takes.items():
            counts[key] += amount
            if counts[key] == amount:  # a new counter lives two windows
                expirations[key] = now + 2 * window
        self.sweep()

    def adjust(self, key: str, window: int, wid: str, delta: int, now: float) -> bool:
        """Add *delta* to the counter *wid* of *key* if it is still the current or previous
        window (older counters no longer weigh anything). Never below zero."""
        if delta == 0:
            return False
        keys = self._window_keys(key, window, now)
        if wid != keys[3] and wid != keys[2]:
            return False
        if delta < 0:
            self.decr(wid, -delta, now)
        else:
            self.incr(wid, 2 * window, delta, now)
        return True


def memory_counters() -> MemoryStorage:
    """limits' memory storage, sweeping expired counters at most once a second."""
    return MemoryCounters().storage


def memory_window_keys(key: str, window: int, now: float | None = None) -> tuple[str, str]:
    """(previous, current) counter keys of *key* in limits' memory storage."""
    return MemoryStorage.sliding_window_keys(key, window, time.time() if now is None else now)


async def memory_adjust(
    storage: MemoryStorage, key: str, window: int, wid: str, delta: int
) -> bool:
    """:meth:`MemoryCounters.adjust` through limits' own async API, on any memory storage."""
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
