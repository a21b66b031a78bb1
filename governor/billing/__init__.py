"""Credit billing: prices to credits, a ledger of balances and budgets, latency insurance.

See docs/billing.md. :class:`BillingMiddleware` is the ASGI layer; :class:`Ledger` is
the backend contract with :class:`MemoryLedger` and :class:`RedisLedger` beside it.
"""

from __future__ import annotations

from governor.billing.base import KeySpend, Ledger, Limits, Refusal, Reservation, Settlement
from governor.billing.insurance import Insurance
from governor.billing.memory import MemoryLedger
from governor.billing.middleware import (
    BillingMiddleware,
    QuotaExceeded,
    ledger_for,
    opening_balance,
    splice_hypereal,
)
from governor.billing.pricing import Rates, credits_for, estimate_usage, rates
from governor.billing.redis import RedisLedger

__all__ = [
    "BillingMiddleware",
    "Insurance",
    "KeySpend",
    "Ledger",
    "Limits",
    "MemoryLedger",
    "QuotaExceeded",
    "Rates",
    "RedisLedger",
    "Refusal",
    "Reservation",
    "Settlement",
    "credits_for",
    "estimate_usage",
    "ledger_for",
    "opening_balance",
    "rates",
    "splice_hypereal",
]
