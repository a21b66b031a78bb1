"""Slots and queues in this process: the reference implementation of the contract.

Correct for one worker; also the local fallback the Redis backend's users drop to when
Redis is down (at a fair share of the limit). Grants are handed straight to the chosen
waiter's future when a slot is released, so a newcomer can never take a slot ahead of
someone already waiting.
"""

from __future__ import annotations

import asyncio
import collections
import itertools

from governor.admission.base import (
    HoldTimes,
    Lease,
    Pool,
    PoolStats,
    QueueLimits,
    Rejected,
    SlotBackend,
    Waiter,
)


class _PoolState:
    __slots__ = (
        "grants",
        "held",
        "held_by",
        "last",
        "pool",
        "queued",
        "queued_tokens",
        "queues",
        "tokens_by",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.held: dict[str, str] = {}  # lease id -> account
        self.held_by: collections.Counter[str] = collections.Counter()
        # Insertion-ordered per account; each deque is FIFO.
        self.queues: dict[str, collections.deque[_MemoryWaiter]] = {}
        self.queued = 0
        self.queued_tokens = 0
        self.tokens_by: collections.Counter[str] = collections.Counter()
        # When each account holding or waiting was last granted a slot (grant count).
        self.last: dict[str, int] = {}
        self.grants = 0

    def tidy(self, account: str) -> None:
        if account not in self.held_by and account not in self.queues:
            self.last.pop(account, None)


class _MemoryWaiter(Waiter):
    __slots__ = ("_ahead", "_future", "_slots", "_state", "account", "pool", "seq", "tokens")

    def __init__(
        self, slots: MemorySlots, state: _PoolState, account: str, tokens: int, seq: int
    ) -> None:
        self._slots = slots
        self._state = state
        self.pool = state.pool
        self.account = account
        self.tokens = tokens
        self.seq = seq
        self._ahead = state.queued
        self._future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()

    @property
    def ahead(self) -> int:
        if not self._future.done():
            self._ahead = max(0, self._state.queued - 1)
        return self._ahead

    @property
    def mean_hold_s(self) -> float | None:
        return self._slots.hold_times.get(self.pool)

    async def wait(self) -> Lease:
        # Shielded: only cancel() decides what happens to the place in the queue.
        return await asyncio.shield(self._future)

    async def cancel(self) -> Lease | None:
        if self._future.done():
            return None if self._future.cancelled() else self._future.result()
        _ = self.ahead  # as it stood when leaving
        self._slots._unqueue(self._state, self)
        self._future.cancel()
        return None


class MemorySlots(SlotBackend):
    """Slot pools in this process, fair between accounts, FIFO within one."""

    in_process = True

    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits if limits is not None else QueueLimits()
        self.hold_times = HoldTimes()
        self._pools: dict[str, _PoolState] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    def _state(self, pool: Pool) -> _PoolState:
        state = self._pools.get(pool.name)
        if state is None:
            state = self._pools[pool.name] = _PoolState(pool)
        state.pool = pool
        return state

    def _grant(self, state: _PoolState, account: str) -> Lease:
        lease_id = f"m{next(self._ids)}"
        state.held[lease_id] = account
        state.held_by[account] += 1
        state.grants += 1
        state.last[account] = state.grants
        return Lease(lease_id, state.pool, account, max(0, state.pool.limit - len(state.held)))

    async def admit(self, pool: Pool, account: str, tokens: int) -> Lease | Waiter:
        state = self._state(pool)
        if not state.queues and len(state.held) < pool.limit:
            return self._grant(state, account)
        limits = self.limits
        reason = None
        if state.queued >= limits.max_waiters:
            reason = "queue_full"
        elif pool.queue_tokens is not None and state.queued_tokens + tokens > pool.queue_tokens:
            reason = "queue_tokens"
        else:
            queue = state.queues.get(account)
            if queue is not None and len(queue) >= limits.max_waiters_per_account:
                reason = "account_queue_full"
            elif (
                limits.max_queued_tokens_per_account is not None
                and state.tokens_by[account] + tokens > limits.max_queued_tokens_per_account
            ):
                reason = "account_queue_tokens"
        if reason is not None:
            raise Rejected(reason, ahead=state.queued, mean_hold_s=self.hold_times.get(pool))
        waiter = _MemoryWaiter(self, state, account, tokens, next(self._seq))
        state.queues.setdefault(account, collections.deque()).append(waiter)
        state.queued += 1
        state.queued_tokens += tokens
        state.tokens_by[account] += tokens
        return waiter

    def _unqueue(self, state: _PoolState, waiter: _MemoryWaiter) -> None:
        queue = state.queues.get(waiter.account)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del state.queues[waiter.account]
        state.queued -= 1
        state.queued_tokens -= waiter.tokens
        state.tokens_by[waiter.account] -= waiter.tokens
        if state.tokens_by[waiter.account] <= 0:
            del state.tokens_by[waiter.account]
        state.tidy(waiter.account)

    def _dispatch(self, state: _PoolState) -> None:
        # Round robin between accounts: the waiting account least recently granted a
        # slot goes next, ties to the oldest head; a linear scan, as waiting accounts
        # are few.
        last = state.last
        while state.queues and len(state.held) < state.pool.limit:
            account = min(state.queues, key=lambda a: (last.get(a, 0), state.queues[a][0].seq))
            waiter = state.queues[account][0]
            self._unqueue(state, waiter)
            waiter._future.set_result(self._grant(state, account))

    async def release(self, lease: Lease, held_s: float | None) -> None:
        state = self._pools.get(lease.pool.name)
        if state is None:
            return
        account = state.held.pop(lease.id, None)
        if account is None:
            return
        state.held_by[account] -= 1
        if state.held_by[account] <= 0:
            del state.held_by[account]
            state.tidy(account)
        if held_s is not None:
            self.hold_times.observe(lease.pool, held_s)
        self._dispatch(state)

    async def stats(self, pool: Pool) -> PoolStats:
        state = self._pools.get(pool.name)
        if state is None:
            return PoolStats(0, 0)
        return PoolStats(len(state.held), state.queued)
