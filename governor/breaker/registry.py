"""Every breaker of one :class:`~governor.runtime.Governor`, the Redis sync, the operator API.

One registry per Governor (:func:`breakers_for`), so several breaker middlewares and the
admin routes built on the same Governor see the same breakers.

Redis mode keeps the request path off Redis: each worker decides from its cached copy
of the shared state, refreshed in the background every ``sync_interval_s`` (a pipelined
read of every path it has seen) and from the replies of its own writes. Only two things
wait on Redis, each for at most ``sync_timeout_s`` (what is still running after that
finishes in the background): the first request of a path (or after a long idle), and a
caller that wants to become a half-open probe (fleet-wide probe leases). Outcomes are
written in the background; the request waits for the write for at most the same bound,
so that the next request on this worker usually sees its effect.

Redis unreachable (:class:`~governor.errors.BackendError`) or too slow: the breaker
section has no ``fail_mode`` because there is one sane answer, keep breaking locally.
Each worker then runs its own breaker from the last shared state it saw, counts on its
own, logs the degradation and sets ``governor_breaker_degraded``; the next good sync
puts the shared state back in charge.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from prometheus_client import Counter

from governor.backends import RedisBackend
from governor.breaker.base import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    PROBES_BUSY_RETRY_S,
    STATE_CODE,
    Admission,
    Refusal,
    Snapshot,
    Verdict,
    path_of,
    split_path,
)
from governor.breaker.memory import LocalBreaker
from governor.breaker.redis import RedisBreakerStore
from governor.catalog import ModelSpec
from governor.config import BreakerConfig
from governor.errors import BackendError, ConfigurationError, NotFound
from governor.runtime import Governor

log = logging.getLogger("governor.breaker")

_T = TypeVar("_T")

# The background sync stops after this long without a request; the next one restarts it.
_IDLE_STOP_S = 60.0


def breakers_for(governor: Governor, config: BreakerConfig | None = None) -> BreakerRegistry:
    """The breaker registry of *governor*, made on first use (from ``config.breaker``)."""
    registry = governor.shared("breaker.registry", lambda: BreakerRegistry(governor, config))
    if config is not None and config != registry.config:
        raise ConfigurationError(
            "breaker: this Governor already has breakers with another configuration"
        )
    return registry


class BreakerRegistry:
    """The breakers of one Governor, by model path, and the operator's controls."""

    def __init__(self, governor: Governor, config: BreakerConfig | None = None) -> None:
        self.governor = governor
        self.config = config if config is not None else governor.config.breaker
        self.clock = governor.clock
        backend = governor.backend
        self.store = (
            RedisBreakerStore(backend, self.config) if isinstance(backend, RedisBackend) else None
        )
        self._breakers: dict[str, LocalBreaker] = {}
        self._by_model: dict[str, LocalBreaker] = {}
        self._verdicts: dict[str, dict[Verdict, Counter]] = {}
        self.degraded = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._syncer: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._last_seen = 0.0
        self._closed = False
        m = governor.metrics
        self._state = m.gauge(
            "breaker_state",
            "Circuit state per model path: 0 closed, 1 half-open, 2 open.",
            ("model", "upstream"),
            multiprocess_mode="livemax",
        )
        self._transitions = m.counter(
            "breaker_transitions",
            "Circuit state changes seen by this worker.",
            ("model", "upstream", "from_state", "to_state"),
        )
        self._refusals = m.counter(
            "breaker_refusals",
            "Requests refused at once by a circuit breaker.",
            ("model", "upstream", "reason"),
        )
        self._outcomes = m.counter(
            "breaker_outcomes",
            "Request outcomes as the breaker counted them.",
            ("model", "upstream", "verdict"),
        )
        self._degraded_gauge = m.gauge(
            "breaker_degraded",
            "1 while this worker's breakers run locally because Redis is unreachable.",
            multiprocess_mode="livemax",
        )
        self._backend_errors = m.counter(
            "breaker_backend_errors", "Redis errors and timeouts met by the breakers."
        )

    # --- breakers ---------------------------------------------------------------------

    def breaker(self, model: ModelSpec) -> LocalBreaker:
        lb = self._by_model.get(model.id)
        if lb is None or lb.path != path_of(model):
            path = path_of(model)
            lb = self._breakers.get(path)
            if lb is None:
                lb = self._breakers[path] = LocalBreaker(path, self.config, self._changed)
                labels = split_path(path)
                self._state.labels(*labels).set(0)
                self._verdicts[path] = {v: self._outcomes.labels(*labels, v.value) for v in Verdict}
            self._by_model[model.id] = lb
        return lb

    def _changed(self, lb: LocalBreaker, old: str, new: str) -> None:
        model, upstream = split_path(lb.path)
        self._state.labels(model, upstream).set(STATE_CODE[new])
        self._transitions.labels(model, upstream, old, new).inc()
        log.info("breaker %s: %s -> %s", lb.path, old, new)

    def _model(self, model_id: str) -> ModelSpec:
        spec = self.governor.catalog.get(model_id)
        if spec is None:
            raise NotFound(f"The model '{model_id[:200]}' does not exist in this catalog.")
        return spec

    # --- the request path -------------------------------------------------------------

    async def admit(self, model: ModelSpec) -> Admission | Refusal:
        """Let a request on *model* through, or refuse it at once."""
        lb = self.breaker(model)
        decision = await self._admit(lb)
        if isinstance(decision, Refusal):
            self._refusals.labels(*split_path(lb.path), decision.reason).inc()
        return decision

    async def _admit(self, lb: LocalBreaker) -> Admission | Refusal:
        now = self.clock.monotonic()
        if self.store is None:
            return lb.admit(now)
        self._last_seen = now
        self._ensure_syncer()
        age = math.inf if lb.synced_at is None else now - lb.synced_at
        if not self.degraded and age > 2 * self.config.sync_interval_s:
            # Never synced (or the sync stopped while idle): read it now, bounded.
            await self._bounded(self._refresh([lb.path]))
        elif age > self.config.sync_interval_s or self.degraded:
            self._kick_refresh()
        now = self.clock.monotonic()
        if self.degraded:
            return lb.admit(now, degraded=True)
        forced = lb.forced
        if forced is not None:
            return lb.admit(now)  # the held state needs no lease
        if lb.state == CLOSED:
            return Admission(lb.path, CLOSED, gen=lb.gen, shared=True)
        if lb.state == OPEN and now < lb.open_until:
            return Refusal(OPEN, lb.open_until - now, "open")
        return await self._shared_probe(lb, now)

    async def _shared_probe(self, lb: LocalBreaker, now: float) -> Admission | Refusal:
        """Ask Redis for a probe lease; only so many callers on this worker ask at once."""
        if lb.pending_probes >= self.config.half_open_probes or now < lb.probe_backoff_until:
            return Refusal(HALF_OPEN, PROBES_BUSY_RETRY_S, "probes_busy")
        assert self.store is not None
        probe_id = uuid.uuid4().hex
        lb.pending_probes += 1
        task = self._spawn(self.store.probe(lb.path, probe_id))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.config.sync_timeout_s)
        except asyncio.CancelledError:
            # The caller is gone: a lease granted for it is given straight back.
            task.add_done_callback(lambda t: self._release_late_probe(lb, t, probe_id))
            raise
        if not done:
            # Too slow: decide locally; a lease granted later is given straight back.
            task.add_done_callback(lambda t: self._release_late_probe(lb, t, probe_id))
            self._degrade("probe lease timed out")
            return lb.admit(self.clock.monotonic(), degraded=True)
        try:
            snap, granted = task.result()
        except BackendError as exc:
            lb.pending_probes -= 1
            self._degrade(str(exc))
            return lb.admit(self.clock.monotonic(), degraded=True)
        now = self.clock.monotonic()
        self._mirror_write(lb, snap)
        if granted:
            return Admission(lb.path, HALF_OPEN, probe=True, shared=True, probe_id=probe_id)
        lb.pending_probes -= 1
        if snap.forced is not None:
            return lb.admit(now)
        if snap.state == CLOSED:  # another worker's probes closed it meanwhile
            return Admission(lb.path, CLOSED, gen=lb.gen, shared=True)
        if snap.state == OPEN:
            return Refusal(OPEN, snap.remaining_s, "open")
        # Every probe place is taken, fleet-wide: ask again after the next sync at most.
        lb.probe_backoff_until = now + self.config.sync_interval_s
        return Refusal(HALF_OPEN, PROBES_BUSY_RETRY_S, "probes_busy")

    def _release_late_probe(
        self, lb: LocalBreaker, task: asyncio.Task[tuple[Snapshot, bool]], probe_id: str
    ) -> None:
        lb.pending_probes = max(0, lb.pending_probes - 1)
        if task.cancelled() or task.exception() is not None:
            return
        if task.result()[1] and self.store is not None:
            self._spawn(self.store.record(lb.path, Verdict.NEUTRAL, probe_id))

    async def settle(self, admission: Admission, verdict: Verdict) -> None:
        """Record how an admitted request ended. Never raises; waits on Redis boundedly."""
        lb = self._breakers[admission.path]
        self._verdicts[lb.path][verdict].inc()
        now = self.clock.monotonic()
        if not admission.shared:
            lb.record(admission, verdict, now)
            return
        if admission.probe:
            lb.pending_probes = max(0, lb.pending_probes - 1)
        elif verdict is Verdict.NEUTRAL or not admission.record:
            return
        elif verdict is Verdict.SUCCESS and lb.shared_fails == 0 and lb.state == CLOSED:
            return  # nothing to reset: a healthy path costs Redis nothing per request
        task = self._spawn(self._write(lb, admission, verdict))
        if verdict is not Verdict.NEUTRAL:
            await asyncio.wait({task}, timeout=self.config.sync_timeout_s)

    async def _write(self, lb: LocalBreaker, admission: Admission, verdict: Verdict) -> None:
        assert self.store is not None
        try:
            snap = await self.store.record(lb.path, verdict, admission.probe_id)
        except BackendError as exc:
            self._degrade(str(exc))
            # The outcome still counts, in this worker's own breaker.
            lb.record(Admission(lb.path, lb.state, gen=lb.gen), verdict, self.clock.monotonic())
            return
        self._mirror_write(lb, snap)

    def _mirror_write(self, lb: LocalBreaker, snap: Snapshot) -> None:
        lb.writes += 1
        lb.mirror(snap, self.clock.monotonic())

    # --- background sync --------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _bounded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run *coro*, waiting at most ``sync_timeout_s``; past that it runs on alone.

        Never cancelled half-way: a command cut off mid-flight would leave a shared
        connection out of step.
        """
        task = self._spawn(coro)
        done, _ = await asyncio.wait({task}, timeout=self.config.sync_timeout_s)
        if not done:
            self._degrade("sync timed out")

    def _kick_refresh(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._spawn(self._refresh(list(self._breakers)))

    async def _refresh(self, paths: list[str]) -> None:
        """Read the shared state of *paths* into the local breakers; never raises."""
        if self.store is None or not paths:
            return
        writes = {p: self._breakers[p].writes for p in paths if p in self._breakers}
        try:
            snaps = await self.store.read(paths)
        except BackendError as exc:
            self._degrade(str(exc))
            return
        now = self.clock.monotonic()
        for path, snap in snaps.items():
            lb = self._breakers.get(path)
            # A write's reply that came back while this read was out is newer than it.
            if lb is not None and lb.writes == writes.get(path):
                lb.mirror(snap, now)
        if self.degraded:
            self.degraded = False
            self._degraded_gauge.set(0)
            log.warning("breaker: Redis reachable again; shared breaker state back in charge")

    def _degrade(self, why: str) -> None:
        self._backend_errors.inc()
        if not self.degraded:
            self.degraded = True
            self._degraded_gauge.set(1)
            log.warning("breaker: Redis unavailable (%s); breaking locally per worker", why)

    def _ensure_syncer(self) -> None:
        if self._closed or (self._syncer is not None and not self._syncer.done()):
            return
        self._syncer = asyncio.ensure_future(self._sync_loop())

    async def _sync_loop(self) -> None:
        while not self._closed:
            await self.clock.sleep(self.config.sync_interval_s)
            if self.clock.monotonic() - self._last_seen > _IDLE_STOP_S:
                return
            await self.sync()

    async def sync(self) -> None:
        """Refresh every known path from Redis now (the sync loop, tests, admin views)."""
        await self._shielded(self._refresh(list(self._breakers)))

    async def _shielded(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await *coro* in a task of its own: a cancelled caller leaves it to finish."""
        return await asyncio.shield(self._spawn(coro))

    async def drain(self) -> None:
        """Wait for every background write and read in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop the background sync and let writes in flight finish."""
        self._closed = True
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
            self._syncer = None
        await self.drain()

    # --- the operator -----------------------------------------------------------------

    async def force_open(self, model_id: str) -> dict[str, object]:
        """Hold *model_id*'s breaker open (fleet-wide in Redis mode) until cleared."""
        return await self._override(model_id, "open")

    async def force_close(self, model_id: str) -> dict[str, object]:
        """Hold *model_id*'s breaker closed, whatever the traffic does, until cleared."""
        return await self._override(model_id, "closed")

    async def clear_override(self, model_id: str) -> dict[str, object]:
        """Drop the hold; the automatic state takes over where it was."""
        return await self._override(model_id, "clear")

    async def reset(self, model_id: str) -> dict[str, object]:
        """Drop the hold and close the breaker with fresh counters."""
        return await self._override(model_id, "reset")

    async def _override(self, model_id: str, action: str) -> dict[str, object]:
        lb = self.breaker(self._model(model_id))
        scope = "local"
        if self.store is not None:
            try:
                snap = await self._shielded(self.store.force(lb.path, action))
            except BackendError as exc:
                # Still obey the operator here; the other workers cannot be told.
                self._degrade(str(exc))
            else:
                self._mirror_write(lb, snap)
                scope = "fleet"
                return self._describe(model_id, lb, scope)
        if action == "reset":
            lb.reset()
        else:
            lb.force(None if action == "clear" else action)
        log.warning("breaker %s: operator %s (%s)", lb.path, action, scope)
        return self._describe(model_id, lb, scope)

    async def states(self) -> dict[str, dict[str, object]]:
        """Every catalog model's breaker, as this worker sees it (fresh from Redis if shared)."""
        for spec in self.governor.catalog.values():
            self.breaker(spec)
        await self.sync()
        return {
            model_id: self._describe(model_id, self.breaker(spec), None)
            for model_id, spec in self.governor.catalog.items()
        }

    def _describe(self, model_id: str, lb: LocalBreaker, scope: str | None) -> dict[str, object]:
        info = lb.describe(self.clock.monotonic())
        info["model"] = model_id
        info["upstream"] = split_path(lb.path)[1]
        if self.store is not None and not self.degraded:
            info["consecutive_failures"] = lb.shared_fails
        info["shared"] = self.store is not None and not self.degraded
        if scope is not None:
            info["scope"] = scope
        return info
