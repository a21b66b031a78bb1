"""The ledger in this process: exact and atomic (no await inside an operation)."""

from __future__ import annotations

import dataclasses
import itertools

from governor.billing.base import (
    BALANCE,
    DAILY_BUDGET,
    DAY,
    HOUR,
    HOURLY_BUDGET,
    SPENDING_LIMIT,
    KeySpend,
    Limits,
    Refusal,
    Reservation,
    Settlement,
    window_ids,
)
from governor.clock import Clock


@dataclasses.dataclass
class _Account:
    balance: int
    held: int = 0


@dataclasses.dataclass
class _Key:
    life: int = 0
    hour_id: int = -1
    hour: int = 0
    day_id: int = -1
    day: int = 0


class MemoryLedger:
    """Balances and budgets in dicts; calendar windows on the injected clock's wall time."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._accounts: dict[str, _Account] = {}
        self._keys: dict[tuple[str, str], _Key] = {}
        self._live: set[str] = set()
        self._ids = itertools.count(1)

    def _key(self, account: str, key_id: str) -> _Key:
        key = self._keys.get((account, key_id))
        if key is None:
            key = self._keys[(account, key_id)] = _Key()
        return key

    async def reserve(
        self, account: str, key_id: str, opening: int, amount: int, limits: Limits
    ) -> Reservation | Refusal:
        now = self._clock.time()
        hour, day = window_ids(now)
        acct = self._accounts.get(account)
        if acct is None:
            acct = self._accounts[account] = _Account(opening)
        key = self._key(account, key_id)
        if key.hour_id != hour:
            key.hour_id, key.hour = hour, 0
        if key.day_id != day:
            key.day_id, key.day = day, 0
        available = acct.balance - acct.held
        if available < amount:
            return Refusal(BALANCE, available, None)
        if limits.spending_limit is not None and key.life + amount > limits.spending_limit:
            return Refusal(SPENDING_LIMIT, limits.spending_limit - key.life, None)
        if limits.hourly_budget is not None and key.hour + amount > limits.hourly_budget:
            return Refusal(HOURLY_BUDGET, limits.hourly_budget - key.hour, (hour + 1) * HOUR - now)
        if limits.daily_budget is not None and key.day + amount > limits.daily_budget:
            return Refusal(DAILY_BUDGET, limits.daily_budget - key.day, (day + 1) * DAY - now)
        acct.held += amount
        key.life += amount
        key.hour += amount
        key.day += amount
        rid = f"r{next(self._ids)}"
        self._live.add(rid)
        return Reservation(rid, account, key_id, amount, hour, day, available)

    async def settle(self, reservation: Reservation, actual: int, limits: Limits) -> Settlement:
        r = reservation
        acct = self._accounts[r.account]
        key = self._key(r.account, r.key_id)
        same_hour = key.hour_id == r.hour
        same_day = key.day_id == r.day
        if r.id in self._live:
            self._live.discard(r.id)
            acct.held -= r.amount
            key.life -= r.amount
            if same_hour:
                key.hour -= r.amount
            if same_day:
                key.day -= r.amount
        headroom = acct.balance - acct.held
        if limits.spending_limit is not None:
            headroom = min(headroom, limits.spending_limit - key.life)
        if limits.hourly_budget is not None and same_hour:
            headroom = min(headroom, limits.hourly_budget - key.hour)
        if limits.daily_budget is not None and same_day:
            headroom = min(headroom, limits.daily_budget - key.day)
        charge = max(0, min(actual, headroom))
        before = acct.balance
        acct.balance -= charge
        key.life += charge
        if same_hour:
            key.hour += charge
        if same_day:
            key.day += charge
        return Settlement(charge, before, acct.balance)

    async def compensate(self, account: str, credits: int) -> int:
        acct = self._accounts[account]
        acct.balance += credits
        return acct.balance

    async def balance(self, account: str, opening: int) -> int:
        acct = self._accounts.get(account)
        return opening if acct is None else acct.balance

    async def spent(self, account: str, key_id: str) -> KeySpend:
        hour, day = window_ids(self._clock.time())
        key = self._keys.get((account, key_id), _Key())
        return KeySpend(
            key.life,
            key.hour if key.hour_id == hour else 0,
            key.day if key.day_id == day else 0,
        )
