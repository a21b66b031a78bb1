"""Fingerprint state in Redis: fleet-wide, and suspensions survive restarts (no TTL).

Key layout (prefix ``gov``; ``{key_id}`` is a Redis-Cluster hash tag so one script
touches one slot):

- ``gov:fp:{key_x}:susp``      suspension record (JSON), no TTL
- ``gov:fp:{key_x}:strikes``   strike counter, TTL ``strike_ttl_s``
- ``gov:fp:{key_x}:dev|ses|addr``  sorted sets member -> last seen ms, TTL = window
- ``gov:fp:replay:<sha256>``   first sender of a body, TTL ``replay_window_s``
- ``gov:fp:epoch``             a random token naming this generation of the data: a
  worker that finds it changed knows Redis lost its data (flush, restart without
  persistence) and writes back the suspensions it holds (docs/reliability.md)
"""

from __future__ import annotations

import uuid

from governor.backends import RedisBackend, map_redis_errors
from governor.fingerprint.store import Seen, Suspension, Windows


class RedisFingerprintStore:
    """Suspensions, strikes and behaviour shared by every worker."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self._strike = backend.script(__package__, "strike.lua")
        self._observe = backend.script(__package__, "observe.lua")
        self._replay = backend.script(__package__, "replay.lua")

    async def epoch(self) -> str:
        """The token of the current generation of the data (made if missing)."""
        key = self.backend.key("fp", "epoch")
        with map_redis_errors("fingerprint"):
            await self.backend.redis.set(key, uuid.uuid4().hex, nx=True)
            value = await self.backend.redis.get(key)
        return value.decode() if isinstance(value, bytes) else str(value)

    def _k(self, key_id: str, what: str) -> str:
        return self.backend.key("fp", "{" + key_id + "}", what)

    async def suspension(self, key_id: str) -> Suspension | None:
        with map_redis_errors("fingerprint"):
            raw = await self.backend.redis.get(self._k(key_id, "susp"))
        return Suspension.from_json(raw) if raw else None

    async def strike(self, record: Suspension, *, threshold: int, ttl_s: float) -> tuple[int, bool]:
        keys = [self._k(record.key_id, "strikes"), self._k(record.key_id, "susp")]
        args = [max(1, int(ttl_s * 1000)), threshold, record.to_json()]
        count, suspended = await self.backend.run(self._strike, keys, args)
        return int(count), bool(suspended)

    async def observe(
        self, key_id: str, device: str, session: str, address: str, windows: Windows
    ) -> Seen:
        keys = [self._k(key_id, "dev"), self._k(key_id, "ses"), self._k(key_id, "addr")]
        args: list[str | int] = []
        for member, window in (
            (device, windows.devices_s),
            (session, windows.sessions_s),
            (address, windows.addresses_s),
        ):
            args += [member, max(1, int(window * 1000)), windows.cap]
        counts = await self.backend.run(self._observe, keys, args)
        return Seen(*(int(c) for c in counts))

    async def first_sender(self, body_hash: str, sender: str, ttl_s: float) -> str | None:
        key = self.backend.key("fp", "replay", body_hash)
        first = await self.backend.run(self._replay, [key], [sender, max(1, int(ttl_s * 1000))])
        if not first:
            return None
        return first.decode() if isinstance(first, bytes) else str(first)

    async def suspensions(self) -> list[Suspension]:
        # Operators only: SCAN (per node in a cluster) instead of an index key in
        # another slot than the records.
        pattern = self.backend.key("fp", "*", "susp")
        out = []
        with map_redis_errors("fingerprint"):
            async for key in self.backend.redis.scan_iter(match=pattern, count=500):
                raw = await self.backend.redis.get(key)
                if raw:
                    out.append(Suspension.from_json(raw))
        return sorted(out, key=lambda s: s.at)

    async def suspend(self, record: Suspension) -> None:
        with map_redis_errors("fingerprint"):
            await self.backend.redis.set(self._k(record.key_id, "susp"), record.to_json())

    async def lift(self, key_id: str) -> bool:
        with map_redis_errors("fingerprint"):
            async with self.backend.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._k(key_id, "susp"))
                pipe.delete(self._k(key_id, "strikes"))
                removed, _ = await pipe.execute()
        return bool(removed)
