"""AdmissionMiddleware: a per-model concurrency slot, behind a short and fair wait queue.

Innermost in the stack (just outside the app): a slot is held only by a request every
other guard has admitted, from admission until the response body is completely sent,
the client disconnects or the app raises. See ``docs/admission.md``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from governor import headers as h
from governor.admission.base import (
    Lease,
    Pool,
    QueueLimits,
    Rejected,
    SlotBackend,
    Waiter,
    estimate_retry_after,
)
from governor.admission.memory import MemorySlots
from governor.aio import start
from governor.context import RequestContext, Surface
from governor.degraded import degraded_for
from governor.errors import BackendError, Overloaded, RateLimited, RequestError, Shape
from governor.runtime import Governor
from governor.types import ASGIApp, Message, RawHeaders, Receive, Scope, Send

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# After a Redis failure, requests skip Redis (local share, or 503 when failing closed)
# for this long instead of each paying a connect timeout.
BACKEND_RETRY_S = 1.0

_LIMIT = h.wire(h.CONCURRENCY_LIMIT)
_REMAINING = h.wire(h.CONCURRENCY_REMAINING)
_WAIT_MS = h.wire(h.QUEUE_WAIT_MS)
_DEGRADED = h.header(h.DEGRADED, "admission")
# count_tokens is answered without generating: it takes no model slot.
_SKIP = (Surface.COUNT_TOKENS,)  # a tuple: `in` compares identity, no Enum hash


class ModelBusy(RateLimited):
    """The model's slots and wait queue are full for everyone: 429 on OpenAI paths,
    529 ``overloaded_error`` on Anthropic paths (what Anthropic's SDKs and Claude Code
    read as transient overload, rather than the caller's own rate limit)."""

    anthropic_type = "overloaded_error"
    default_code = "model_at_capacity"

    def status_for(self, shape: Shape) -> int:
        return 529 if shape is Shape.ANTHROPIC else 429


@dataclasses.dataclass(frozen=True, slots=True)
class _Meters:
    in_flight: Gauge
    queue_wait: Histogram
    immediate: Counter
    queued: Counter
    degraded: Counter


class _Gone(Exception):
    """The client disconnected while its request was waiting."""


class _Receiver:
    """The request's ``receive``, watchable for a disconnect while the request waits.

    The watcher's pending ``receive()`` runs as a shielded task: cancelling the watcher
    once the slot is granted never drops a message, and whatever it read (the body
    governor replays comes first) is handed to the app in order.
    """

    __slots__ = ("_buffer", "_pending", "_receive", "used")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buffer: collections.deque[Message] = collections.deque()
        self._pending: asyncio.Future[Message] | None = None
        self.used = False

    async def _next(self) -> Message:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive())
        message = await asyncio.shield(self._pending)
        self._pending = None
        return message

    async def disconnected(self) -> None:
        """Return once the client has gone; keep every other message for the app."""
        self.used = True
        while True:
            message = await self._next()
            self._buffer.append(message)
            if message["type"] == "http.disconnect":
                return

    async def receive(self) -> Message:
        if self._buffer:
            return self._buffer.popleft()
        if self._pending is not None:
            return await self._next()
        return await self._receive()

    def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()


class AdmissionMiddleware:
    """Admits each model call into a concurrency slot of its model, queueing it briefly.

    Slots are per model (``ModelSpec.concurrency``), fleet-wide with a Redis backend;
    a key with ``model_limits[model].concurrency`` also waits for a slot of its own on
    that model first. The queue is FIFO within an account and fair between accounts,
    bounded by ``config.admission`` (wait time, waiters, waiters and tokens per account)
    and the model's ``queue_tokens``. Refusals: 429 (Anthropic paths: 529 when the model
    is full for everyone) with a ``Retry-After`` estimated from the queue.
    """

    def __init__(
        self, app: ASGIApp, *, governor: Governor | None = None, slots: SlotBackend | None = None
    ) -> None:
        self.app = app
        self.governor = governor if governor is not None else Governor()
        gov = self.governor
        self.config = cfg = gov.config.admission
        limits = QueueLimits(
            cfg.max_waiters, cfg.max_waiters_per_account, cfg.max_queued_tokens_per_account
        )
        self._owns_slots = slots is None
        if slots is None:
            if gov.backend.kind == "redis":
                from governor.admission.redis import RedisSlots
                from governor.backends import RedisBackend

                assert isinstance(gov.backend, RedisBackend)
                slots = RedisSlots(
                    gov.backend,
                    limits,
                    lease_ttl_s=cfg.lease_ttl_s,
                    heartbeat_s=cfg.heartbeat_s,
                    poll_s=cfg.poll_s,
                    on_lease_lost=self._lease_lost,
                    on_leases_restored=self._leases_restored,
                )
            else:
                slots = MemorySlots(limits)
        self.slots: SlotBackend = slots
        # Used only while the shared backend is down and fail_mode is "open".
        self._fallback = MemorySlots(limits)
        self.degraded = degraded_for(self.governor)
        self._down_until = float("-inf")
        self._output_reserve = gov.config.ratelimit.default_output_reserve
        self._pools = {
            m.id: Pool(m.id, m.concurrency, queue_tokens=m.queue_tokens)
            for m in gov.catalog.values()
        }
        self._tasks: set[asyncio.Future[Any]] = set()
        self._retries: set[asyncio.Future[Any]] = set()
        self._closed = False
        metrics = gov.metrics
        self._in_flight = metrics.gauge(
            "admission_in_flight", "Requests holding a concurrency slot.", ("model",)
        )
        self._queue_depth = metrics.gauge(
            "admission_queue_depth", "Requests waiting for a concurrency slot.", ("model",)
        )
        self._queue_wait = metrics.histogram(
            "admission_queue_wait_seconds", "Time admitted requests waited for a slot.", ("model",)
        )
        self._admitted = metrics.counter(
            "admission_admitted",
            "Requests admitted, by path (immediate, queued, degraded).",
            ("model", "path"),
        )
        self._rejected = metrics.counter(
            "admission_rejected", "Requests refused by admission, by reason.", ("model", "reason")
        )
        self._abandoned = metrics.counter(
            "admission_abandoned", "Clients that left while waiting for a slot.", ("model",)
        )
        self._lost = metrics.counter(
            "admission_leases_lost", "Slot leases that expired while held.", ("model",)
        )
        self._restored = metrics.counter(
            "admission_leases_restored",
            "Slot leases granted again after Redis lost the pool's data.",
            ("model",),
        )
        self._backend_errors = metrics.counter(
            "admission_backend_errors", "Slot backend failures, by operation.", ("op",)
        )
        # Label children bound once per model (labels() costs more than inc()).
        self._meters: dict[str, _Meters] = {}
        gov.on_close(self.aclose)

    async def aclose(self) -> None:
        """Wait for releases in flight and stop the slot backend's background tasks."""
        if self._closed:
            return
        self._closed = True
        for retry in self._retries:
            retry.cancel()  # the leases expire by themselves within their TTL
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_slots:
            await self.slots.aclose()

    def _bind(self, model: str) -> _Meters:
        meters = self._meters[model] = _Meters(
            self._in_flight.labels(model),
            self._queue_wait.labels(model),
            self._admitted.labels(model, "immediate"),
            self._admitted.labels(model, "queued"),
            self._admitted.labels(model, "degraded"),
        )
        return meters

    def _lease_lost(self, model: str) -> None:
        self._lost.labels(model).inc()

    def _leases_restored(self, model: str, count: int) -> None:
        self._restored.labels(model).inc(count)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entered = await self.governor.model_call(self.app, scope, receive, send, skip=_SKIP)
        if entered is None:
            return
        ctx, receive, send = entered
        await self._governed(ctx, scope, receive, send)

    # --- one request ------------------------------------------------------------------

    def _pools_for(self, ctx: RequestContext) -> list[Pool]:
        assert ctx.model is not None
        model = ctx.model
        pool = self._pools.get(model.id) or Pool(model.id, model.concurrency)
        limits = ctx.policy.model_limits.get(model.id)
        if limits is not None and limits.concurrency is not None:
            return [Pool(model.id, limits.concurrency, key=ctx.key_id), pool]
        return [pool]

    async def _governed(
        self, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        assert ctx.model is not None
        model_id = ctx.model.id
        meters = self._meters.get(model_id) or self._bind(model_id)
        clock = self.governor.clock
        started = clock.monotonic()
        deadline = started + self.config.max_wait_s
        tokens = ctx.input_tokens + ctx.output_reserve(self._output_reserve)
        receiver = _Receiver(receive)
        held: list[tuple[SlotBackend, Lease]] = []
        admitted = False
        released = False
        granted_at = started

        async def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            held_s = clock.monotonic() - granted_at if admitted else None
            for slots, lease in reversed(held):
                try:
                    await slots.release(lease, held_s)
                except BackendError as exc:
                    self._release_failed(slots, lease, held_s, exc)
            if admitted:
                meters.in_flight.dec()

        async def finish() -> None:
            # In-process slots release without suspending: nothing to shield.
            if all(slots.in_process for slots, _ in held):
                await release()
            else:
                await self._shielded(release())

        try:
            degraded = queued = False
            pools = self._pools_for(ctx)
            pool = pools[0]
            try:
                for pool in pools:
                    slots, lease, waited, fell_back = await self._acquire(
                        ctx, pool, tokens, receiver, deadline
                    )
                    held.append((slots, lease))
                    queued |= waited
                    degraded |= fell_back
            except Rejected as rejected:
                await self._reject(ctx, send, pool, rejected, started, degraded)
                return
            except _Gone:
                ctx.notes["queue_wait_ms"] = self._ms(clock.monotonic() - started)
                self._abandoned.labels(model_id).inc()
                return
            except BackendError as exc:  # fail_mode "closed"
                await self._unavailable(ctx, send, pool, exc, started)
                return

            granted_at = clock.monotonic()
            admitted = True
            wait_s = granted_at - started
            wait_ms = self._ms(wait_s)
            ctx.notes["queue_wait_ms"] = wait_ms
            meters.in_flight.inc()
            meters.queue_wait.observe(wait_s)
            if degraded:
                meters.degraded.inc()
            elif queued:
                meters.queued.inc()
            else:
                meters.immediate.inc()
            lease = held[-1][1]
            extra: RawHeaders = [
                (_LIMIT, str(lease.pool.limit).encode()),
                (_REMAINING, str(lease.remaining).encode()),
                (_WAIT_MS, str(wait_ms).encode()),
            ]
            if degraded:
                ctx.notes["degraded"] = True
                extra.append(_DEGRADED)

            ctx.add_headers(extra)

            async def send_admitted(message: Message) -> None:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    # The upstream is done: the slot goes back now, not after whatever
                    # the app still does (background tasks). Begun before the body is
                    # passed on, so that on Redis the release rides in the same round
                    # trip as billing's settlement, which an outer layer sends first.
                    releasing = start(release())
                    try:
                        await send(message)
                    finally:
                        if releasing is not None:
                            await asyncio.shield(releasing)
                    return
                await send(message)

            await self.app(scope, receiver.receive if receiver.used else receive, send_admitted)
        finally:
            if held and not released:
                await finish()
            receiver.close()

    async def _acquire(
        self,
        ctx: RequestContext,
        pool: Pool,
        tokens: int,
        receiver: _Receiver,
        deadline: float,
    ) -> tuple[SlotBackend, Lease, bool, bool]:
        """A lease of *pool*: (backend, lease, waited, degraded). Raises Rejected, _Gone,
        or BackendError when the shared backend is down and fail_mode is "closed"."""
        clock = self.governor.clock
        mode = self.config.fail_mode
        if clock.monotonic() < self._down_until:
            self.degraded.mark(ctx, "admission", mode)
            if mode == "closed":
                raise BackendError("admission: the slot backend is down")
            return await self._take(
                self._fallback, self._share(pool), ctx, tokens, receiver, deadline
            ) + (True,)
        try:
            taken = await self._take(self.slots, pool, ctx, tokens, receiver, deadline)
            if not self.slots.in_process:
                self.degraded.healthy("admission")
            return (*taken, False)
        except BackendError as exc:
            self.degraded.mark(ctx, "admission", mode)
            self._backend_errors.labels("admit").inc()
            self._down_until = clock.monotonic() + BACKEND_RETRY_S
            log.warning(
                "admission: slot backend failed (fail_mode=%s): %s", self.config.fail_mode, exc
            )
            if self.config.fail_mode == "closed":
                raise
            # Fail open, but never at the full limit per worker: a fair share of it.
            return await self._take(
                self._fallback, self._share(pool), ctx, tokens, receiver, deadline
            ) + (True,)

    def _share(self, pool: Pool) -> Pool:
        workers = self.slots.live_workers(pool.model) or self.config.fallback_workers
        return dataclasses.replace(pool, limit=max(1, pool.limit // max(1, workers)))

    async def _take(
        self,
        slots: SlotBackend,
        pool: Pool,
        ctx: RequestContext,
        tokens: int,
        receiver: _Receiver,
        deadline: float,
    ) -> tuple[SlotBackend, Lease, bool]:
        result = await slots.admit(pool, ctx.account, tokens)
        if isinstance(result, Lease):
            return slots, result, False
        depth = self._queue_depth.labels(pool.model)
        depth.inc()
        try:
            return slots, await self._wait(slots, result, receiver, deadline), True
        finally:
            depth.dec()

    async def _wait(
        self, slots: SlotBackend, waiter: Waiter, receiver: _Receiver, deadline: float
    ) -> Lease:
        """Wait for *waiter*'s slot until *deadline*, leaving at once if the client goes."""
        granted = asyncio.ensure_future(waiter.wait())
        gone = asyncio.ensure_future(receiver.disconnected())
        timer = asyncio.ensure_future(self._until(deadline))
        tasks = (granted, gone, timer)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled while queued: leave the queue (and give back a slot granted at
            # that very moment) in the background, where no second cancel can stop it.
            self._spawn(self._leave(slots, waiter))
            raise
        finally:
            for task in tasks:
                task.cancel()
        client_gone = gone.done() and not gone.cancelled()
        if granted.done() and not granted.cancelled():
            exc = granted.exception()
            if exc is not None:  # re-admission refused, or the backend failed
                self._spawn(self._leave(slots, waiter))
                raise exc
            lease = granted.result()
            if client_gone:
                self._spawn(self._release(slots, lease))
                raise _Gone
            return lease
        late = await self._shielded(waiter.cancel())
        if client_gone:
            if late is not None:
                self._spawn(self._release(slots, late))
            raise _Gone
        if late is not None:  # granted just as the wait ran out: keep it
            return late
        raise Rejected("queue_timeout", ahead=waiter.ahead, mean_hold_s=waiter.mean_hold_s)

    async def _until(self, deadline: float) -> None:
        # The time left is read when the timer runs, not when it is created: the clock
        # may have moved in between.
        clock = self.governor.clock
        while (left := deadline - clock.monotonic()) > 0:
            await clock.sleep(left)

    async def _leave(self, slots: SlotBackend, waiter: Waiter) -> None:
        lease = await waiter.cancel()
        if lease is not None:
            await self._release(slots, lease)

    async def _release(self, slots: SlotBackend, lease: Lease) -> None:
        try:
            await slots.release(lease, None)
        except BackendError as exc:
            self._release_failed(slots, lease, None, exc)

    def _release_failed(
        self, slots: SlotBackend, lease: Lease, held_s: float | None, exc: BackendError
    ) -> None:
        # The lease expires by itself within its TTL (it is no longer renewed); a
        # release retried until Redis answers gives the slot back sooner. Releases
        # are idempotent, so a retry after a lost reply does no harm.
        self._backend_errors.labels("release").inc()
        log.warning("admission: release failed, retrying: %s", exc)
        retry = self._spawn(self._retry_release(slots, lease, held_s))
        self._retries.add(retry)
        retry.add_done_callback(self._retries.discard)

    async def _retry_release(self, slots: SlotBackend, lease: Lease, held_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.lease_ttl_s
        delay = 0.05
        while loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            try:
                await slots.release(lease, held_s)
            except BackendError:
                delay = min(delay * 2, 2.0)
                continue
            self.degraded.healthy("admission")
            return

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _shielded(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run *coro* to the end even if the caller is cancelled meanwhile."""
        task: asyncio.Future[_T] = self._spawn(coro)
        return await asyncio.shield(task)

    # --- refusals ---------------------------------------------------------------------

    @staticmethod
    def _ms(seconds: float) -> int:
        return max(0, round(seconds * 1000))

    def _refusal_headers(
        self, ctx: RequestContext, pool: Pool, wait_ms: int, degraded: bool
    ) -> RawHeaders:
        assert ctx.model is not None
        limit = pool.limit if pool.key is None else self._pools_for(ctx)[-1].limit
        extra: RawHeaders = [
            (_LIMIT, str(limit).encode()),
            (_REMAINING, b"0"),
            (_WAIT_MS, str(wait_ms).encode()),
        ]
        if degraded:
            extra.append(_DEGRADED)
        return extra

    async def _reject(
        self,
        ctx: RequestContext,
        send: Send,
        pool: Pool,
        rejected: Rejected,
        started: float,
        degraded: bool,
    ) -> None:
        now = self.governor.clock.monotonic()
        wait_ms = self._ms(now - started)
        ctx.notes["queue_wait_ms"] = wait_ms
        # Refused by the local fallback while the shared backend is down.
        degraded = degraded or now < self._down_until
        if degraded:
            ctx.notes["degraded"] = True
        retry_after = estimate_retry_after(
            rejected.ahead, pool.limit, rejected.mean_hold_s, self.config.max_wait_s
        )
        headers = self._refusal_headers(ctx, pool, wait_ms, degraded)
        model = pool.model
        when = f"retry after {int(retry_after)} s"
        error: RequestError
        if pool.key is not None:
            reason = "key_" + rejected.reason
            error = RateLimited(
                f"This API key may run {pool.limit} concurrent requests on {model} and no "
                f"slot of its own became free in time; {when}.",
                code="concurrency_limit_exceeded",
                retry_after=retry_after,
                should_retry=True,
                headers=headers,
                reason=reason,
            )
        elif rejected.reason.startswith("account_"):
            reason = rejected.reason
            what = "requests" if reason == "account_queue_full" else "tokens"
            error = RateLimited(
                f"Your account already has too many {what} waiting for {model}; {when}.",
                code="too_many_queued_requests",
                retry_after=retry_after,
                should_retry=True,
                headers=headers,
                reason=reason,
            )
        else:
            reason = rejected.reason
            why = {
                "queue_full": "its wait queue is full",
                "queue_tokens": "the tokens waiting in its queue are at their bound",
                "queue_timeout": f"no slot became free within {self.config.max_wait_s:g} s",
            }.get(reason, reason)
            error = ModelBusy(
                f"{model} is at its concurrency limit and {why}; {when}.",
                code=reason,
                retry_after=retry_after,
                should_retry=True,
                headers=headers,
                reason=reason,
            )
        self._rejected.labels(model, reason).inc()
        await self.governor.refuse(ctx, send, error)

    async def _unavailable(
        self, ctx: RequestContext, send: Send, pool: Pool, exc: BackendError, started: float
    ) -> None:
        wait_ms = self._ms(self.governor.clock.monotonic() - started)
        ctx.notes["queue_wait_ms"] = wait_ms
        ctx.notes["degraded"] = True
        self._rejected.labels(pool.model, "backend_unavailable").inc()
        error = Overloaded(
            "Admission control cannot reach its shared state; retry shortly.",
            retry_after=BACKEND_RETRY_S,
            should_retry=True,
            headers=self._refusal_headers(ctx, pool, wait_ms, True),
            reason="backend_unavailable",
        )
        await self.governor.refuse(ctx, send, error)
