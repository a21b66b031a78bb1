"""Slots and queues in Redis, shared by every worker of the fleet.

Each operation is one call of ``slots.lua`` (time from Redis ``TIME``). Slots are
leases with a TTL, renewed by one heartbeat per model per worker, so a worker that
dies gives its slots back within the TTL. A released slot is handed straight to the
next waiter in fair order and the waiter's worker is told over pub/sub (one
subscriber per process); pub/sub is only a hint, so each worker also polls its own
waiters in one batched call per pool every ``poll_s`` (jittered), which also keeps
their places alive. Background tasks start on first use and stop in :meth:`aclose`.

Each pool has an epoch in Redis that changes only when its data is lost; the heartbeat
carries the one this worker saw last, and on a change Redis grants this worker's
still-held leases again (so a flush over-admits for at most one heartbeat interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from governor.admission.base import (
    Lease,
    Pool,
    PoolStats,
    QueueLimits,
    Rejected,
    SlotBackend,
    Waiter,
)
from governor.aio import cancel_all
from governor.backends import RedisBackend
from governor.errors import BackendError

log = logging.getLogger(__name__)

_PARTS = ("sem", "lmeta", "q", "qlive", "qmeta", "ready", "st")


def account_digest(account: str) -> str:
    """The fixed-width hex id an account goes by in Redis (lexical FIFO needs it)."""
    return hashlib.sha256(account.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _hold_s(raw: Any) -> float | None:
    if not raw:
        return None
    return float(raw) / 1000.0


class _RedisWaiter(Waiter):
    """A place in a pool's queue in Redis; woken by pub/sub hints and the poller."""

    def __init__(
        self, slots: RedisSlots, pool: Pool, account: str, digest: str, ticket: str
    ) -> None:
        self._slots = slots
        self.pool = pool
        self.account = account
        self.digest = digest
        self.ticket = ticket
        self._ahead = 0
        self._mean_hold_s: float | None = None
        self._signal = asyncio.Event()
        self._hinted = False
        self._gone = False
        self._lease: Lease | None = None
        self._error: BackendError | None = None

    @property
    def ahead(self) -> int:
        return self._ahead

    @property
    def mean_hold_s(self) -> float | None:
        return self._mean_hold_s

    def _hint(self) -> None:
        self._hinted = True
        self._signal.set()

    def _granted(self, lease: Lease) -> None:
        self._lease = lease
        self._signal.set()

    def _lost(self) -> None:
        self._gone = True
        self._signal.set()

    def _fail(self, exc: BackendError) -> None:
        # Redis stopped answering while we wait: the middleware applies the fail mode
        # (a local slot at the fair share, or 503) instead of waiting out max_wait_s.
        self._error = exc
        self._signal.set()

    async def wait(self) -> Lease:
        slots = self._slots
        while True:
            if self._lease is not None:
                return self._lease
            if self._error is not None:
                raise self._error
            if self._gone:
                # Our place lapsed (this worker stalled past the liveness window):
                # join again with the same ticket.
                self._gone = False
                await slots._readmit(self)
                continue
            if self._hinted:
                self._hinted = False
                await slots._poll(self.pool, [self])
                continue
            self._signal.clear()
            await self._signal.wait()

    async def cancel(self) -> Lease | None:
        slots = self._slots
        slots._forget_waiter(self)
        if self._lease is not None:
            return self._lease
        try:
            reply = await slots._call(self.pool, "cancel", [self.ticket])
        except BackendError as exc:
            # The place lapses by itself within the liveness window.
            log.warning("admission: cancel failed: %s", exc)
            return None
        if int(reply[0]) == 1:
            lease = Lease(self.ticket, self.pool, self.account, int(reply[1]))
            slots._hold(lease, self.digest)
            return lease
        return None


class RedisSlots(SlotBackend):
    """Slot pools in Redis under ``<prefix>:adm:{<model>}:…`` (one hash slot per model)."""

    def __init__(
        self,
        backend: RedisBackend,
        limits: QueueLimits | None = None,
        *,
        lease_ttl_s: float = 30.0,
        heartbeat_s: float = 10.0,
        poll_s: float = 0.25,
        worker_id: str | None = None,
        on_lease_lost: Callable[[str], None] | None = None,
        on_leases_restored: Callable[[str, int], None] | None = None,
    ) -> None:
        if heartbeat_s >= lease_ttl_s:
            raise ValueError("heartbeat_s must be shorter than lease_ttl_s")
        self.backend = backend
        self.limits = limits if limits is not None else QueueLimits()
        self._script = backend.script(__package__, "slots.lua")
        self._channel = backend.key("adm", "wake")
        self._ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._heartbeat_s = heartbeat_s
        self._poll_s = poll_s
        # A waiter is dropped, and a slot handed to it taken back, when its worker has
        # not polled for this long: several missed polls, at least 2 s.
        self._live_ms = max(2_000, round(poll_s * 8_000))
        self._worker = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._on_lease_lost = on_lease_lost
        self._on_leases_restored = on_leases_restored
        self._keys: dict[str, list[str]] = {}
        # model -> pool name -> (pool, lease id -> account digest) for this worker's
        # leases: the heartbeat needs the digest to grant a lease again after data loss.
        self._held: dict[str, dict[str, tuple[Pool, dict[str, str]]]] = {}
        # pool name -> the pool's epoch as this worker last saw it (heartbeat, admit)
        self._epochs: dict[str, str] = {}
        # pool name -> (pool, ticket -> waiter) for this worker's waiters
        self._waiting: dict[str, tuple[Pool, dict[str, _RedisWaiter]]] = {}
        self._by_ticket: dict[str, _RedisWaiter] = {}
        self._workers: dict[str, int] = {}
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    # --- keys and calls ---------------------------------------------------------------

    def _tag(self, model: str) -> str:
        return self.backend.key("adm", "{" + model + "}")

    def _pool_keys(self, pool: Pool) -> list[str]:
        keys = self._keys.get(pool.name)
        if keys is None:
            base = self._tag(pool.model)
            if pool.key is not None:
                base += ":k:" + pool.key
            keys = self._keys[pool.name] = [f"{base}:{part}" for part in _PARTS]
        return keys

    async def _call(self, pool: Pool, op: str, args: list[Any]) -> Any:
        head = [op, pool.limit, self._channel, self._live_ms, self._ttl_ms]
        return await self.backend.run(self._script, self._pool_keys(pool), head + args)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- the contract -----------------------------------------------------------------

    async def admit(self, pool: Pool, account: str, tokens: int) -> Lease | Waiter:
        if self._closed:
            raise BackendError("admission: the Redis slot backend is closed")
        self._held.setdefault(pool.model, {})
        self._start()
        waiter = _RedisWaiter(self, pool, account, account_digest(account), uuid.uuid4().hex)
        # Registered before the call, so a wake-up that beats the reply is not lost.
        self._by_ticket[waiter.ticket] = waiter
        limits = self.limits
        args = [
            waiter.ticket,
            waiter.digest,
            max(0, int(tokens)),
            limits.max_waiters,
            -1 if pool.queue_tokens is None else pool.queue_tokens,
            limits.max_waiters_per_account,
            -1
            if limits.max_queued_tokens_per_account is None
            else limits.max_queued_tokens_per_account,
        ]
        call = asyncio.ensure_future(self._call(pool, "admit", args))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The admit may still land: give back whatever it took once it has.
            self._by_ticket.pop(waiter.ticket, None)
            self._spawn(self._abandon(pool, waiter.ticket, call))
            raise
        except BaseException:
            self._by_ticket.pop(waiter.ticket, None)
            raise
        return self._admitted(waiter, reply)

    def _admitted(self, waiter: _RedisWaiter, reply: list[Any]) -> Lease | Waiter:
        status = int(reply[0])
        if status:
            # Granted or queued, the reply ends with the pool's epoch. The first one
            # lets this worker tell a loss before its first heartbeat of the pool. One
            # that differs means a loss around this call, which the heartbeat may have
            # seen already (the admit ran before it, the reply came after): "?" matches
            # no epoch, so the next heartbeat restores whatever this worker holds.
            name = waiter.pool.name
            epoch = _text(reply[-1])
            known = self._epochs.get(name)
            if known != epoch:
                self._epochs[name] = epoch if known is None else "?"
        if status == 1:
            self._forget_waiter(waiter)
            lease = Lease(waiter.ticket, waiter.pool, waiter.account, int(reply[1]))
            self._hold(lease, waiter.digest)
            return lease
        if status == 2:
            waiter._ahead = max(0, int(reply[1]) - 1)
            waiter._mean_hold_s = _hold_s(reply[2])
            _, waiting = self._waiting.setdefault(waiter.pool.name, (waiter.pool, {}))
            waiting[waiter.ticket] = waiter
            if self._poller is None or self._poller.done():
                self._poller = asyncio.ensure_future(self._poll_loop())
            return waiter
        self._forget_waiter(waiter)
        reason = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        raise Rejected(reason, ahead=int(reply[2]), mean_hold_s=_hold_s(reply[3]))

    async def _readmit(self, waiter: _RedisWaiter) -> None:
        limits = self.limits
        pool = waiter.pool
        reply = await self._call(
            pool,
            "admit",
            [
                waiter.ticket,
                waiter.digest,
                0,
                limits.max_waiters,
                -1,
                limits.max_waiters_per_account,
                -1,
            ],
        )
        result = self._admitted(waiter, reply)
        if isinstance(result, Lease):
            waiter._granted(result)

    async def _abandon(self, pool: Pool, ticket: str, call: asyncio.Future[Any]) -> None:
        await asyncio.wait([call])
        if not call.cancelled():
            call.exception()  # retrieved: it was the caller's to see, and it has gone
        with contextlib.suppress(BackendError):
            await self._call(pool, "release", [ticket, -1])

    async def release(self, lease: Lease, held_s: float | None) -> None:
        self._unhold(lease)
        held_ms = -1 if held_s is None else max(0, round(held_s * 1000))
        await self._call(lease.pool, "release", [lease.id, held_ms])

    async def stats(self, pool: Pool) -> PoolStats:
        # Through the script, so lapsed leases and waiters are swept first.
        held, queued = await self._call(pool, "stats", [])
        return PoolStats(int(held), int(queued))

    def live_workers(self, model: str) -> int | None:
        return self._workers.get(model)

    # --- local bookkeeping ------------------------------------------------------------

    def _hold(self, lease: Lease, digest: str) -> None:
        pools = self._held.setdefault(lease.pool.model, {})
        _, ids = pools.setdefault(lease.pool.name, (lease.pool, {}))
        ids[lease.id] = digest

    def _unhold(self, lease: Lease) -> None:
        entry = self._held.get(lease.pool.model, {}).get(lease.pool.name)
        if entry is not None:
            entry[1].pop(lease.id, None)

    def _forget_waiter(self, waiter: _RedisWaiter) -> None:
        self._by_ticket.pop(waiter.ticket, None)
        entry = self._waiting.get(waiter.pool.name)
        if entry is not None:
            entry[1].pop(waiter.ticket, None)
            if not entry[1]:
                del self._waiting[waiter.pool.name]

    async def _poll(self, pool: Pool, waiters: list[_RedisWaiter]) -> None:
        """One call for many waiters: claim granted slots, keep the others alive."""
        reply = await self._call(pool, "poll", [w.ticket for w in waiters])
        mean_hold = _hold_s(reply[0])
        for i, waiter in enumerate(waiters):
            status, value = int(reply[1 + 2 * i]), int(reply[2 + 2 * i])
            if waiter.ticket not in self._by_ticket:
                continue  # cancelled meanwhile: cancel() settles it
            waiter._mean_hold_s = mean_hold
            if status == 1:
                self._forget_waiter(waiter)
                lease = Lease(waiter.ticket, pool, waiter.account, value)
                self._hold(lease, waiter.digest)
                waiter._granted(lease)
            elif status == 2:
                waiter._ahead = max(0, value - 1)
            else:
                waiter._lost()

    # --- background tasks -------------------------------------------------------------

    def _start(self) -> None:
        if self._listener is None:
            self._listener = asyncio.ensure_future(self._listen())
            self._heartbeat = asyncio.ensure_future(self._heartbeat_loop())

    async def _listen(self) -> None:
        """One subscriber per process: wake the waiters named in grant messages."""
        backoff = 0.05
        while True:
            pubsub = self.backend.redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is None or message.get("type") != "message":
                        continue
                    for raw in message["data"].split():
                        waiter = self._by_ticket.get(raw.decode())
                        if waiter is not None:
                            waiter._hint()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The poller keeps waiters moving while the subscriber is down.
                log.warning("admission: wake-up subscriber failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    async def _poll_loop(self) -> None:
        """Runs while this worker has waiters: the fallback for lost wake-ups."""
        while self._waiting:
            await asyncio.sleep(self._poll_s * random.uniform(0.8, 1.2))
            for pool, waiting in list(self._waiting.values()):
                if not waiting:
                    continue
                try:
                    await self._poll(pool, list(waiting.values()))
                except BackendError as exc:
                    log.warning("admission: poll failed: %s", exc)
                    for waiter in list(waiting.values()):
                        waiter._fail(exc)

    async def _heartbeat_loop(self) -> None:
        """Renews this worker's leases: one call per model every ``heartbeat_s``; also
        registers the worker, so the degraded share (limit // workers) is known."""
        while True:
            for model in list(self._held):
                await self._beat(model)
            await asyncio.sleep(self._heartbeat_s)

    async def _beat(self, model: str) -> None:
        pools = list(self._held.get(model, {}).values())
        keys = [f"{self._tag(model)}:workers"]
        args: list[Any] = ["heartbeat", self._worker, self._ttl_ms, self._ttl_ms]
        for pool, ids in pools:
            sem, lmeta, *_, st = self._pool_keys(pool)
            keys += (sem, lmeta, st)
            args.append(self._epochs.get(pool.name, ""))
            args.append(len(ids))
            for pair in list(ids.items()):
                args.extend(pair)
        try:
            reply = await self.backend.run(self._script, keys, args)
        except BackendError as exc:
            log.warning("admission: heartbeat failed: %s", exc)
            return
        self._workers[model] = max(1, int(reply[0]))
        at = 1
        for pool, ids in pools:
            epoch = _text(reply[at])
            n = int(reply[at + 1])
            restored = [_text(r) for r in reply[at + 2 : at + 2 + n]]
            at += 2 + n
            n = int(reply[at])
            lost = [_text(r) for r in reply[at + 1 : at + 1 + n]]
            at += 1 + n
            seen = self._epochs.get(pool.name)
            self._epochs[pool.name] = epoch
            if restored:
                self._restored(pool, restored, ids, seen, epoch)
            for lease_id in lost:
                if lease_id in ids:  # not released meanwhile
                    log.warning("admission: lease %s on %s expired before renewal", lease_id, model)
                    if self._on_lease_lost is not None:
                        self._on_lease_lost(model)

    def _restored(
        self, pool: Pool, restored: list[str], ids: dict[str, str], seen: str | None, epoch: str
    ) -> None:
        # A lease released after this beat was sent may have been granted again by it
        # (the release ran first, found nothing after the loss, then the beat re-added
        # it). The release has left ids, so give such a lease back once more; this call
        # runs after the beat, so it cannot be overtaken. Should it fail, the lease is
        # renewed by nobody and lapses within the TTL.
        kept = 0
        for lease_id in restored:
            if lease_id in ids:
                kept += 1
            else:
                self._spawn(self._give_back(pool, lease_id))
        log.warning(
            "admission: pool %s lost its data in Redis (epoch %s -> %s): restored %d "
            "leases this worker still holds",
            pool.name,
            seen or "unknown",
            epoch,
            kept,
        )
        if kept and self._on_leases_restored is not None:
            self._on_leases_restored(pool.model, kept)

    async def _give_back(self, pool: Pool, lease_id: str) -> None:
        try:
            await self._call(pool, "release", [lease_id, -1])
        except BackendError as exc:
            log.warning("admission: release of a restored lease failed: %s", exc)

    async def aclose(self) -> None:
        self._closed = True
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        tasks = [t for t in (self._listener, self._heartbeat, self._poller) if t is not None]
        await cancel_all(tasks)  # the subscriber may swallow a first cancellation
        self._listener = self._heartbeat = self._poller = None
