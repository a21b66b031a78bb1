"""The one clock governor reads.

Every middleware takes its time from a :class:`Clock` so that tests move time
instead of sleeping (aiolimiter's ``MockLoopTime`` idea). ``monotonic()`` orders
events and measures durations; ``time()`` is wall-clock seconds for records and
for budget windows that follow the calendar (hourly, daily).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """A source of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; for durations and deadlines."""
        ...

    def time(self) -> float:
        """Seconds since the epoch; for records and calendar windows."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait *seconds* on this clock."""
        ...


class SystemClock:
    """The real clock."""

    # The C functions themselves: read several times per request, and a method around
    # them doubles the cost of each read.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to; sleepers wake when time passes them.

    Tests call :meth:`advance` instead of sleeping.
    """

    def __init__(self, start: float = 1_000.0, wall: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move time forward by *seconds* and wake every sleeper whose time has come."""
        self._now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self._now]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)


SYSTEM_CLOCK = SystemClock()
