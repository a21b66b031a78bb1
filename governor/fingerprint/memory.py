"""Fingerprint state in this process: bounded dicts with TTLs on the injectable clock."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from governor.clock import Clock
from governor.fingerprint.store import Seen, Suspension, Windows

# Bounds on what is tracked; the oldest entries go first. Suspensions are never evicted.
MAX_KEYS = 100_000
MAX_BODIES = 100_000


class MemoryFingerprintStore:
    """Suspensions, strikes and behaviour for one worker."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._suspended: dict[str, Suspension] = {}
        self._strikes: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # key id -> kind -> member -> last seen
        self._seen: OrderedDict[str, dict[str, dict[str, float]]] = OrderedDict()
        self._bodies: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def epoch(self) -> str:
        """Memory never loses its data behind this process's back."""
        return "memory"

    async def suspension(self, key_id: str) -> Suspension | None:
        return self._suspended.get(key_id)

    async def strike(self, record: Suspension, *, threshold: int, ttl_s: float) -> tuple[int, bool]:
        now = self.clock.time()
        count, expires = self._strikes.pop(record.key_id, (0, 0.0))
        count = count + 1 if expires > now else 1
        self._strikes[record.key_id] = (count, now + ttl_s)
        _trim(self._strikes, MAX_KEYS)
        if count >= threshold:
            self._suspended.setdefault(record.key_id, record)
            return count, True
        return count, False

    async def observe(
        self, key_id: str, device: str, session: str, address: str, windows: Windows
    ) -> Seen:
        now = self.clock.time()
        sets = self._seen.pop(key_id, None) or {}
        self._seen[key_id] = sets
        _trim(self._seen, MAX_KEYS)
        counts = []
        for kind, member, window in (
            ("dev", device, windows.devices_s),
            ("ses", session, windows.sessions_s),
            ("addr", address, windows.addresses_s),
        ):
            if not member:
                counts.append(0)
                continue
            seen = sets.setdefault(kind, {})
            for m in [m for m, t in seen.items() if t <= now - window]:
                del seen[m]
            seen.pop(member, None)
            seen[member] = now
            while len(seen) > windows.cap:  # oldest first: dicts keep insertion order
                del seen[next(iter(seen))]
            counts.append(len(seen))
        return Seen(*counts)

    async def first_sender(self, body_hash: str, sender: str, ttl_s: float) -> str | None:
        now = self.clock.time()
        while self._bodies:  # insertion order is expiry order: one TTL for all
            oldest = next(iter(self._bodies.values()))
            if oldest[1] > now:
                break
            self._bodies.popitem(last=False)
        first = self._bodies.get(body_hash)
        if first is not None:
            return first[0]
        self._bodies[body_hash] = (sender, now + ttl_s)
        _trim(self._bodies, MAX_BODIES)
        return None

    async def suspensions(self) -> list[Suspension]:
        return sorted(self._suspended.values(), key=lambda s: s.at)

    async def suspend(self, record: Suspension) -> None:
        self._suspended[record.key_id] = record

    async def lift(self, key_id: str) -> bool:
        self._strikes.pop(key_id, None)
        return self._suspended.pop(key_id, None) is not None


def _trim(d: OrderedDict[str, Any], bound: int) -> None:
    while len(d) > bound:
        d.popitem(last=False)
