"""The rate store contract: what the middleware asks of a memory or Redis store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from limits import WindowStats

from governor.ratelimit.guards import Adjustment, Decision, Hit, Limit


class RateStore(Protocol):
    """Sliding-window counters for many limits, taken all or none.

    ``acquire`` takes every hit or none of them: a request refused by one limit consumes
    nothing from the others. On refusal, ``Decision.refused`` lists every limit the hits
    do not fit, and each window reports its state without this request.
    ``adjust`` settles earlier hits (refunds and debts) in the window they landed in.
    Redis stores raise :class:`~governor.errors.BackendError` when Redis fails.
    """

    async def acquire(self, hits: Sequence[Hit]) -> Decision: ...

    async def adjust(self, adjustments: Sequence[Adjustment]) -> None: ...

    async def stats(self, limit: Limit) -> WindowStats:
        """limits' own view of *limit* (reset time, remaining), read by limits' strategy."""
        ...
