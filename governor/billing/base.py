"""The ledger contract: account balances, per-key budgets, reservations.

Every amount is whole credits. An account holds a ``balance`` and the sum of the
credits its in-flight requests have ``held``; a key counts what it has spent (and
holds) over its lifetime, in the current hour and in the current day (calendar
windows in UTC). :meth:`Ledger.reserve` checks the balance and every budget and
holds the amount in all of them in one atomic step, so concurrent requests can never
together spend more than any of them allows; :meth:`Ledger.settle` turns a
reservation into the actual charge (0 releases it).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from governor.config import KeyPolicy
from governor.errors import BackendError

HOUR = 3_600
DAY = 86_400

# Refusal reasons, in the order they are checked.
BALANCE = "balance"
SPENDING_LIMIT = "spending_limit"
HOURLY_BUDGET = "hourly_budget"
DAILY_BUDGET = "daily_budget"


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """A key's budgets in credits; None means no limit."""

    spending_limit: int | None = None
    hourly_budget: int | None = None
    daily_budget: int | None = None

    @classmethod
    def of(cls, policy: KeyPolicy) -> Limits:
        return cls(policy.spending_limit, policy.hourly_budget, policy.daily_budget)


@dataclasses.dataclass(frozen=True, slots=True)
class Reservation:
    """Credits held for one request, in the windows it was admitted in."""

    id: str
    account: str
    key_id: str
    amount: int
    hour: int
    day: int
    # Balance minus every hold, before this one.
    available: int


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation was refused and when (seconds) the window resets (None: never)."""

    reason: str
    remaining: int
    retry_after: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    """What a settled request was charged and the balance either side of the charge."""

    charged: int
    balance_before: int
    balance_after: int


@dataclasses.dataclass(frozen=True, slots=True)
class KeySpend:
    """What a key has spent and holds: lifetime, this hour, today."""

    lifetime: int
    hour: int
    day: int


class ReserveUnknown(BackendError):
    """A reservation whose outcome is unknown (Redis failed or timed out mid-call): it
    may hold credits. The ledger's ``cancel(account, key_id, reservation_id)`` releases
    it if it exists and keeps a late copy of the call from holding anything."""

    def __init__(self, message: str, account: str, key_id: str, reservation_id: str) -> None:
        super().__init__(message)
        self.account = account
        self.key_id = key_id
        self.reservation_id = reservation_id


class Ledger(Protocol):
    """Balances, budgets and reservations (memory or Redis)."""

    async def reserve(
        self, account: str, key_id: str, opening: int, amount: int, limits: Limits
    ) -> Reservation | Refusal:
        """Hold *amount* against the balance (seeded with *opening* on first use) and
        every budget of *limits*, or refuse without holding anything."""
        ...

    async def settle(self, reservation: Reservation, actual: int, limits: Limits) -> Settlement:
        """Drop the hold and charge *actual* (0: a release). A charge above the hold is
        taken only as far as the balance and budgets still allow (never below zero)."""
        ...

    async def compensate(self, account: str, credits: int) -> int:
        """Give *credits* back to *account*'s balance; the new balance."""
        ...

    async def balance(self, account: str, opening: int) -> int:
        """The balance of *account* (its *opening* balance if never used)."""
        ...

    async def spent(self, account: str, key_id: str) -> KeySpend:
        """What *key_id* has spent and holds, in the current windows."""
        ...


def window_ids(now: float) -> tuple[int, int]:
    """The UTC calendar hour and day of epoch seconds *now*."""
    return int(now // HOUR), int(now // DAY)
