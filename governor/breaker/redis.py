"""The breaker state every worker shares, in Redis.

Per model path, two keys in the model's hash-tag slot (``{model}``):

- ``<prefix>:{<model>}:breaker:<upstream>``: a HASH with ``state``, ``fails``
  (consecutive, fleet-wide), ``successes`` (probe successes this half-open period),
  ``open_ms`` (length of the current open period), ``open_until`` (Redis ms),
  ``forced`` (the operator's override) and ``ver`` (grows with every write);
- ``<prefix>:{<model>}:breaker:<upstream>:probes``: a ZSET of probe leases, scored by
  their deadline, expiring as a whole with the last lease.

Every transition happens in one Lua script on Redis ``TIME``; reads for the local
cache are one pipelined round trip for every path a worker knows.
"""

from __future__ import annotations

from collections.abc import Sequence

from governor.backends import RedisBackend, map_redis_errors
from governor.breaker.base import STATE_CODE, Snapshot, Verdict, split_path
from governor.config import BreakerConfig

_FIELDS = ("state", "fails", "open_until", "open_ms", "forced", "ver")
_ARG = {Verdict.SUCCESS: "ok", Verdict.FAILURE: "fail", Verdict.NEUTRAL: "neutral"}


class RedisBreakerStore:
    """Shared breaker state: probe leases, outcomes, overrides, bulk reads."""

    def __init__(self, backend: RedisBackend, config: BreakerConfig) -> None:
        self.backend = backend
        self.config = config
        self._probe = backend.script(__package__, "probe.lua")
        self._record = backend.script(__package__, "record.lua")
        self._force = backend.script(__package__, "force.lua")
        self._base_ms = round(config.reset_timeout_s * 1000)
        self._max_ms = round(config.max_reset_timeout_s * 1000)
        self._lease_ms = round(config.probe_lease_s * 1000)

    def keys(self, path: str) -> list[str]:
        model, upstream = split_path(path)
        state = self.backend.key("{" + model + "}", "breaker", upstream)
        return [state, state + ":probes"]

    def _decode(self, reply: list[object]) -> tuple[Snapshot, bool]:
        return Snapshot.from_reply(reply, self.config.reset_timeout_s)

    async def probe(self, path: str, probe_id: str) -> tuple[Snapshot, bool]:
        """Try to take a half-open probe lease; the shared state and whether it was granted."""
        reply = await self.backend.run(
            self._probe,
            self.keys(path),
            [probe_id, self.config.half_open_probes, self._lease_ms],
        )
        return self._decode(reply)

    async def record(self, path: str, verdict: Verdict, probe_id: str = "") -> Snapshot:
        """Record an outcome (a neutral one only gives a probe lease back)."""
        reply = await self.backend.run(
            self._record,
            self.keys(path),
            [
                _ARG[verdict],
                probe_id,
                self.config.failure_threshold,
                self._base_ms,
                self._max_ms,
                self.config.half_open_probes,
            ],
        )
        return self._decode(reply)[0]

    async def force(self, path: str, action: str) -> Snapshot:
        """``open`` / ``closed`` (hold), ``clear`` (release the hold), ``reset``."""
        reply = await self.backend.run(self._force, self.keys(path), [action])
        return self._decode(reply)[0]

    async def read(self, paths: Sequence[str]) -> dict[str, Snapshot]:
        """The shared state of *paths* in one round trip (remaining time on Redis TIME)."""
        with map_redis_errors("breaker read"):
            async with self.backend.redis.pipeline(transaction=False) as pipe:
                pipe.time()
                for path in paths:
                    pipe.hmget(self.keys(path)[0], _FIELDS)
                replies = await pipe.execute()
        seconds, micros = replies[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        out: dict[str, Snapshot] = {}
        for path, values in zip(paths, replies[1:], strict=True):
            state, fails, open_until, open_ms, forced, version = (
                v.decode() if isinstance(v, bytes) else "" for v in values
            )
            state = state if state in STATE_CODE else "closed"
            remaining = max(0, int(float(open_until or 0)) - now_ms) if state == "open" else 0
            out[path] = Snapshot(
                state=state,
                forced=forced or None,
                fails=int(fails or 0),
                remaining_s=remaining / 1000,
                open_for_s=int(float(open_ms or 0)) / 1000 or self.config.reset_timeout_s,
                version=int(float(version or 0)),
            )
        return out
