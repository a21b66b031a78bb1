"""The ledger in Redis: one Lua script per operation, windows on the server's TIME.

Key layout (all keys of one account share the hash tag ``{<account>}``, so every
script touches one cluster slot)::

    <prefix>:bill:{<account>}:acct          hash  balance, held
    <prefix>:bill:{<account>}:key:<key_id>  hash  life, h_id, h, d_id, d
    <prefix>:bill:{<account>}:res           zset  "<id>|<key_id>|<amount>|<hour>|<day>"
                                                  scored by lease expiry (ms)
    <prefix>:bill:{<account>}:done:<id>     string "charge|before|after" (settled)

``done:<id>`` makes a settlement idempotent: one retried after its reply was lost (Redis
cut mid-call) returns the first result instead of charging twice. It expires (PX) twice
the lease after the settlement, the longest a retry runs, so no script sweeps old ids.
(Releases before this one kept ids in a ``done`` hash and a ``done_at`` zset, which
nothing reads any more.)
"""

from __future__ import annotations

import uuid
from typing import Any

from governor.backends import RedisBackend, map_redis_errors
from governor.billing.base import (
    KeySpend,
    Limits,
    Refusal,
    Reservation,
    ReserveUnknown,
    Settlement,
)
from governor.errors import BackendError


def _tag(account: str) -> str:
    # Braces inside the name would move the hash tag.
    return "{" + account.replace("{", "(").replace("}", ")") + "}"


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisLedger:
    """Balances, budgets and reservations shared by every worker through Redis."""

    def __init__(self, backend: RedisBackend, *, lease_s: float = 3_600.0) -> None:
        self._backend = backend
        self._lease_ms = int(lease_s * 1000)
        self._remember_ms = max(1, 2 * self._lease_ms)  # a PX argument is at least 1
        self._reserve = backend.script(__package__, "reserve.lua")
        self._settle = backend.script(__package__, "settle.lua")
        self._cancel = backend.script(__package__, "cancel.lua")

    def _keys(self, account: str, key_id: str) -> list[str]:
        tag = _tag(account)
        b = self._backend
        return [
            b.key("bill", tag, "acct"),
            b.key("bill", tag, "key", key_id),
            b.key("bill", tag, "res"),
        ]

    def _done_key(self, account: str, reservation_id: str) -> str:
        return self._backend.key("bill", _tag(account), "done", reservation_id)

    async def reserve(
        self, account: str, key_id: str, opening: int, amount: int, limits: Limits
    ) -> Reservation | Refusal:
        rid = uuid.uuid4().hex[:16]
        keys = self._keys(account, key_id)
        key_prefix = self._backend.key("bill", _tag(account), "key", "")
        keys.append(self._done_key(account, rid))
        try:
            reply = await self._backend.run(
                self._reserve,
                keys,
                [
                    opening,
                    amount,
                    rid,
                    key_id,
                    self._lease_ms,
                    _limit(limits.spending_limit),
                    _limit(limits.hourly_budget),
                    _limit(limits.daily_budget),
                    key_prefix,
                ],
            )
        except BackendError as exc:
            # The script may have run: the caller cancels it by id (cancel()).
            raise ReserveUnknown(str(exc), account, key_id, rid) from exc
        ok, reason, available, reset_ms, hour, day = reply
        if not int(ok):
            name = reason.decode() if isinstance(reason, bytes) else str(reason)
            reset = int(reset_ms)
            return Refusal(name, int(available), reset / 1000 if reset >= 0 else None)
        return Reservation(rid, account, key_id, amount, int(hour), int(day), int(available))

    async def settle(self, reservation: Reservation, actual: int, limits: Limits) -> Settlement:
        r = reservation
        member = f"{r.id}|{r.key_id}|{r.amount}|{r.hour}|{r.day}"
        keys = [*self._keys(r.account, r.key_id), self._done_key(r.account, r.id)]
        charged, before, after = await self._backend.run(
            self._settle,
            keys,
            [
                member,
                r.amount,
                actual,
                r.hour,
                r.day,
                _limit(limits.spending_limit),
                _limit(limits.hourly_budget),
                _limit(limits.daily_budget),
                r.id,
                self._remember_ms,
            ],
        )
        return Settlement(int(charged), int(before), int(after))

    async def cancel(self, account: str, key_id: str, reservation_id: str) -> bool:
        """Release reservation *reservation_id* if it holds anything, and remember it as
        settled so that a late copy of its reserve call holds nothing. True if released."""
        tag = _tag(account)
        b = self._backend
        released = await b.run(
            self._cancel,
            [*self._keys(account, key_id), self._done_key(account, reservation_id)],
            [reservation_id, self._remember_ms, b.key("bill", tag, "key", "")],
        )
        return bool(int(released))

    async def compensate(self, account: str, credits: int) -> int:
        key = self._backend.key("bill", _tag(account), "acct")
        with map_redis_errors("billing"):
            return int(await self._backend.redis.hincrby(key, "balance", credits))

    async def balance(self, account: str, opening: int) -> int:
        key = self._backend.key("bill", _tag(account), "acct")
        with map_redis_errors("billing"):
            value = await self._backend.redis.hget(key, "balance")
        return opening if value is None else int(value)

    async def spent(self, account: str, key_id: str) -> KeySpend:
        _, khash, _ = self._keys(account, key_id)
        with map_redis_errors("billing"):
            life, h_id, h, d_id, d = await self._backend.redis.hmget(
                khash, ["life", "h_id", "h", "d_id", "d"]
            )
            sec, _us = await self._backend.redis.time()
        hour, day = int(sec) // 3_600, int(sec) // 86_400
        return KeySpend(
            _int(life),
            _int(h) if _int(h_id) == hour and h_id is not None else 0,
            _int(d) if _int(d_id) == day and d_id is not None else 0,
        )
