"""The slot backend contract: pools of concurrency slots, each with a fair wait queue.

A *pool* is one model's slots (fleet-wide in Redis mode), or one key's slots on one
model when the key has a per-model concurrency limit of its own. :meth:`SlotBackend.admit`
either grants a :class:`Lease` at once or hands back a :class:`Waiter` holding a place
in the pool's queue, or raises :class:`Rejected` when a queue bound is hit. The queue
is FIFO within an account and round robin between accounts: a freed slot goes to the
waiting account least recently granted one, ties to the oldest waiter, so an account
flooding the queue delays another's request by at most one slot turnover (see
``docs/admission.md``).
"""

from __future__ import annotations

import abc
import dataclasses
import math

# Retry-After is kept within what both official SDKs honour (Anthropic: 60 s).
MAX_RETRY_AFTER_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class Pool:
    """A set of *limit* slots: a model's (``key`` None) or one key's on a model."""

    model: str
    limit: int
    key: str | None = None
    # Total estimated tokens allowed to wait in this pool's queue (None: no bound).
    queue_tokens: int | None = None

    @property
    def name(self) -> str:
        return self.model if self.key is None else f"{self.model}|{self.key}"


@dataclasses.dataclass(frozen=True, slots=True)
class QueueLimits:
    """Bounds on a pool's queue, from ``config.admission``."""

    max_waiters: int = 1_000
    max_waiters_per_account: int = 100
    max_queued_tokens_per_account: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """One held slot; *remaining* is the pool's free slots once this one was taken."""

    id: str
    pool: Pool
    account: str
    remaining: int


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """How a pool stands: slots held (everyone's) and requests waiting."""

    held: int
    queued: int


class Rejected(Exception):
    """No slot and no place in the queue: *reason* says which bound was hit.

    *ahead* is how many requests were waiting and *mean_hold_s* the pool's recent mean
    slot hold time (None: unknown), from which the caller estimates ``Retry-After``.
    """

    def __init__(self, reason: str, *, ahead: int, mean_hold_s: float | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ahead = ahead
        self.mean_hold_s = mean_hold_s


class Waiter(abc.ABC):
    """A place in a pool's queue."""

    pool: Pool

    @property
    @abc.abstractmethod
    def ahead(self) -> int:
        """Requests waiting in the pool besides this one, as last seen (for Retry-After)."""

    @property
    @abc.abstractmethod
    def mean_hold_s(self) -> float | None:
        """The pool's recent mean slot hold time as last seen."""

    @abc.abstractmethod
    async def wait(self) -> Lease:
        """Wait for the slot; cancelling this does *not* leave the queue (call :meth:`cancel`)."""

    @abc.abstractmethod
    async def cancel(self) -> Lease | None:
        """Leave the queue. Returns the lease if the slot was granted meanwhile: the
        caller then owns it (uses or releases it). Idempotent."""


class SlotBackend(abc.ABC):
    """Where the slots and queues of every pool live."""

    # True when admit/release never suspend (no I/O): a cancellation cannot land in the
    # middle of them, so callers need no shielding task.
    in_process: bool = False

    @abc.abstractmethod
    async def admit(self, pool: Pool, account: str, tokens: int) -> Lease | Waiter:
        """A slot of *pool* for *account* now, or a place in its queue; raises
        :class:`Rejected` when the queue is full for everyone or for *account*.
        *tokens* is the request's estimated size, counted against the queue bounds."""

    @abc.abstractmethod
    async def release(self, lease: Lease, held_s: float | None) -> None:
        """Give *lease* back (idempotent); *held_s* feeds the mean hold time."""

    @abc.abstractmethod
    async def stats(self, pool: Pool) -> PoolStats:
        """Slots held and requests waiting in *pool* (for tests and operators)."""

    def live_workers(self, model: str) -> int | None:
        """Workers last seen serving *model* (Redis mode), for the degraded share."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to stop by default
        """Stop background tasks; leases still held are left to expire."""


def estimate_retry_after(
    ahead: int, limit: int, mean_hold_s: float | None, default: float
) -> float:
    """Seconds until a slot is likely free for a request behind *ahead* waiters.

    Slots turn over at about ``limit / mean_hold`` per second (Little's law), so the
    queue ahead drains in ``(ahead + 1) * mean_hold / limit``. Without a measured hold
    time *default* stands in for it (the configured maximum wait: the queue has just
    shown a wait that long). Kept within [1, 60] s.
    """
    hold = mean_hold_s if mean_hold_s is not None and mean_hold_s > 0 else default
    seconds = (ahead + 1) * hold / max(1, limit)
    return float(min(MAX_RETRY_AFTER_S, max(1.0, math.ceil(seconds))))


class HoldTimes:
    """An exponentially weighted mean of slot hold times per pool (weight 0.1)."""

    def __init__(self) -> None:
        self._mean: dict[str, float] = {}

    def observe(self, pool: Pool, seconds: float) -> None:
        old = self._mean.get(pool.name)
        self._mean[pool.name] = seconds if old is None else old * 0.9 + seconds * 0.1

    def get(self, pool: Pool) -> float | None:
        return self._mean.get(pool.name)
