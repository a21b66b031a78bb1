"""Admission in Redis: wake-ups, leases, key layout, fail modes, several processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.crc import key_slot

from governor import headers as h
from governor.admission import AdmissionMiddleware, Lease, Pool, PoolStats, QueueLimits
from governor.admission.redis import RedisSlots
from governor.backends import RedisBackend
from governor.backends.redis import make_client
from governor.clock import ManualClock
from governor.config import AdmissionConfig, Config, ModelEntry, RedisConfig
from governor.runtime import Governor
from tests import conftest
from tests.admission_support import CLAUDE, MODEL, KeyedApp, queued, request, until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def slots_for(redis_backend: RedisBackend) -> AsyncIterator[Any]:
    """Build RedisSlots on the test's Redis backend; close them afterwards."""
    made: list[RedisSlots] = []

    def factory(**options: Any) -> RedisSlots:
        options.setdefault("lease_ttl_s", 5.0)
        options.setdefault("heartbeat_s", 1.0)
        slots = RedisSlots(redis_backend, QueueLimits(), **options)
        made.append(slots)
        return slots

    yield factory
    for slots in made:
        await slots.aclose()


async def test_pubsub_wakes_a_waiter_without_polling(slots_for: Any) -> None:
    """A released slot reaches a waiter at once through pub/sub, long before any poll."""
    slots = slots_for(poll_s=60.0)
    pool = Pool(MODEL, 1)
    lease = await slots.admit(pool, "a", 1)
    assert isinstance(lease, Lease)
    waiter = await slots.admit(pool, "b", 1)
    assert not isinstance(waiter, Lease)
    waiting = asyncio.ensure_future(waiter.wait())
    await slots.release(lease, 0.1)
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.id == waiter.ticket
    assert granted.remaining == 0
    await slots.release(granted, 0.1)
    assert (await slots.stats(pool)).held == 0


async def test_poll_finds_a_grant_when_pubsub_is_lost(slots_for: Any) -> None:
    """With the subscriber gone, the batched poll still hands the slot over."""
    slots = slots_for(poll_s=0.05)
    pool = Pool(MODEL, 1)
    lease = await slots.admit(pool, "a", 1)
    assert isinstance(lease, Lease)
    assert slots._listener is not None
    slots._listener.cancel()
    waiter = await slots.admit(pool, "b", 1)
    assert not isinstance(waiter, Lease)
    waiting = asyncio.ensure_future(waiter.wait())
    await slots.release(lease, 0.1)
    granted = await asyncio.wait_for(waiting, 5)
    await slots.release(granted, None)
    assert (await slots.stats(pool)).held == 0


async def test_cancelled_during_admit_takes_nothing(slots_for: Any) -> None:
    """An admit cancelled while its Redis call is in flight gives back what it took."""
    slots = slots_for()
    pool = Pool(MODEL, 1)
    for _ in range(2):  # once granted a slot, once queued behind it
        task = asyncio.ensure_future(slots.admit(pool, "a", 1))
        await asyncio.sleep(0)  # the call is on the wire
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await until(lambda: not slots._background)  # the give-backs have run
    assert await slots.stats(pool) == PoolStats(0, 0)
    holder = await slots.admit(pool, "b", 1)
    assert isinstance(holder, Lease)
    await slots.release(holder, None)


async def test_two_workers_share_one_limit(slots_for: Any) -> None:
    """Two workers (two backends objects) count against one fleet-wide limit."""
    one, two = slots_for(), slots_for()
    pool = Pool(MODEL, 2)
    a = await one.admit(pool, "a", 1)
    b = await two.admit(pool, "b", 1)
    assert isinstance(a, Lease)
    assert isinstance(b, Lease)
    assert b.remaining == 0
    waiter = await one.admit(pool, "c", 1)
    assert not isinstance(waiter, Lease)
    waiting = asyncio.ensure_future(waiter.wait())
    await two.release(b, 0.1)  # released by the other worker
    granted = await asyncio.wait_for(waiting, 5)
    await one.release(a, None)
    await one.release(granted, None)


async def test_heartbeat_keeps_a_lease_alive(slots_for: Any) -> None:
    """A lease held past its TTL stays, renewed by the worker's heartbeat."""
    slots = slots_for(lease_ttl_s=1.0, heartbeat_s=0.2)
    pool = Pool(MODEL, 1)
    lease = await slots.admit(pool, "a", 1)
    assert isinstance(lease, Lease)
    await asyncio.sleep(1.5)  # past the TTL, on Redis' clock
    assert slots.live_workers(MODEL) == 1
    other = await slots.admit(pool, "b", 1)
    assert not isinstance(other, Lease)
    assert await other.cancel() is None
    await slots.release(lease, None)


async def test_lost_lease_is_reported(redis_backend: RedisBackend) -> None:
    """A held lease that vanished from Redis is reported by the next heartbeat."""
    lost: list[str] = []
    slots = RedisSlots(redis_backend, QueueLimits(), on_lease_lost=lost.append)
    try:
        pool = Pool(MODEL, 1)
        lease = await slots.admit(pool, "a", 1)
        assert isinstance(lease, Lease)
        await redis_backend.redis.zrem(slots._pool_keys(pool)[0], lease.id)
        await slots._beat(MODEL)
        assert lost == [MODEL]
    finally:
        await slots.aclose()


async def test_dead_waiter_cannot_block_the_queue(slots_for: Any) -> None:
    """A slot handed to a waiter whose worker stopped polling comes back after the
    liveness window and goes to the next waiter."""
    dead, alive = slots_for(poll_s=0.05), slots_for(poll_s=0.05)
    pool = Pool(MODEL, 1)
    holder = await alive.admit(pool, "a", 1)
    assert isinstance(holder, Lease)
    ghost = await dead.admit(pool, "b", 1)
    await dead.aclose()  # the worker "dies": no more polls, no claim
    dead._forget_waiter(ghost)
    waiter = await alive.admit(pool, "c", 1)
    assert not isinstance(waiter, Lease)
    await alive.release(holder, None)  # handed to the ghost first
    granted = await asyncio.wait_for(waiter.wait(), 2.0 + 3.0)
    await alive.release(granted, None)
    assert await alive.stats(pool) == PoolStats(0, 0)


async def test_keys_share_one_hash_tag_per_model(redis_backend: RedisBackend) -> None:
    """Every key a model's scripts touch lives in that model's cluster slot."""
    slots = RedisSlots(redis_backend, QueueLimits(), lease_ttl_s=5, heartbeat_s=1)
    try:
        pools = [Pool(MODEL, 1), Pool(MODEL, 1, key="key_abc")]
        held = [await slots.admit(p, "a", 1) for p in pools]
        waiting = [await slots.admit(p, "b", 1) for p in pools]
        await slots._beat(MODEL)
        keys = [k async for k in redis_backend.redis.scan_iter(match=f"{redis_backend.prefix}:*")]
        assert len(keys) >= 8
        assert all(b"{gpt-5-5}" in k for k in keys)
        assert len({key_slot(k) for k in keys}) == 1
        for w in waiting:
            await w.cancel()  # type: ignore[union-attr]
        for x in held:
            await slots.release(x, None)  # type: ignore[arg-type]
    finally:
        await slots.aclose()


# --- data loss (the pool's epoch) ------------------------------------------------------


async def _held_counts(backend: RedisBackend, slots: RedisSlots, pool: Pool) -> list[int]:
    """The pool's per-account held counts in st (none once every lease is back)."""
    st: dict[Any, Any] = await backend.redis.hgetall(slots._pool_keys(pool)[-1])
    return sorted(int(v) for k, v in st.items() if bytes(k).startswith(b"h:"))


async def test_leases_come_back_one_heartbeat_after_data_loss(slots_for: Any) -> None:
    """The pool's keys are deleted (as a flush would) under two leases in flight: the
    next heartbeat of each worker grants them again, on top of what was admitted in the
    gap, so the pool counts more than its limit and the next request waits."""
    restored: list[tuple[str, int]] = []
    # Heartbeats by hand only (the background one beats once, at start).
    options = {"lease_ttl_s": 60.0, "heartbeat_s": 30.0, "poll_s": 0.05}
    one = slots_for(on_leases_restored=lambda m, n: restored.append((m, n)), **options)
    two = slots_for(on_leases_restored=lambda m, n: restored.append((m, n)), **options)
    pool = Pool(MODEL, 2)
    a = await one.admit(pool, "a", 1)
    b = await two.admit(pool, "b", 1)
    assert isinstance(a, Lease)
    assert isinstance(b, Lease)
    # No heartbeat yet: the admits taught each worker the pool's epoch.
    backend = one.backend
    await conftest.drop_prefix(backend.redis, backend.prefix)
    assert await one.stats(pool) == PoolStats(0, 0)
    gap = await one.admit(pool, "c", 1)  # admitted while the pool counted 0
    assert isinstance(gap, Lease)
    await one._beat(MODEL)
    await two._beat(MODEL)
    assert restored == [(MODEL, 1), (MODEL, 1)]
    assert await one.stats(pool) == PoolStats(3, 0)  # over the limit of 2, as it is
    assert await _held_counts(backend, one, pool) == [1, 1, 1]  # a, b and c, as granted
    waiter = await two.admit(pool, "d", 1)
    assert not isinstance(waiter, Lease)
    waiting = asyncio.ensure_future(waiter.wait())
    await one.release(gap, None)
    assert await one.stats(pool) == PoolStats(2, 1)  # still full: no slot handed out
    assert not waiting.done()
    await one.release(a, None)
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.remaining == 0
    for slots, lease in ((two, b), (two, granted)):
        await slots.release(lease, None)
    assert await one.stats(pool) == PoolStats(0, 0)
    assert await _held_counts(backend, one, pool) == []  # held counts restored exactly


async def test_lease_admitted_just_before_the_loss_is_restored(
    slots_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admit that ran before the loss but whose reply came after a heartbeat that saw
    the new epoch: its old epoch in the reply makes the next heartbeat restore it."""
    slots = slots_for(lease_ttl_s=60.0, heartbeat_s=30.0)
    pool = Pool(MODEL, 2)
    first = await slots.admit(pool, "a", 1)
    assert isinstance(first, Lease)
    backend = slots.backend
    run = backend.run

    async def loss_before_reply(script: Any, keys: list[str], args: list[Any]) -> Any:
        reply = await run(script, keys, args)
        if args[0] == "admit":
            monkeypatch.setattr(backend, "run", run)
            await conftest.drop_prefix(backend.redis, backend.prefix)
            await slots._beat(MODEL)  # restores the first lease, learns the new epoch
        return reply

    monkeypatch.setattr(backend, "run", loss_before_reply)
    second = await slots.admit(pool, "b", 1)
    assert isinstance(second, Lease)
    assert await slots.stats(pool) == PoolStats(1, 0)
    await slots._beat(MODEL)
    assert await slots.stats(pool) == PoolStats(2, 0)
    for lease in (first, second):
        await slots.release(lease, None)
    assert await slots.stats(pool) == PoolStats(0, 0)


async def test_swept_lease_is_not_restored_without_data_loss(slots_for: Any) -> None:
    """A lease that expired and was swept, the pool's data intact, is lost: the
    heartbeat does not add it back (that could race its release)."""
    lost: list[str] = []
    restored: list[tuple[str, int]] = []
    slots = slots_for(
        lease_ttl_s=60.0,
        heartbeat_s=30.0,
        on_lease_lost=lost.append,
        on_leases_restored=lambda m, n: restored.append((m, n)),
    )
    pool = Pool(MODEL, 1)
    lease = await slots.admit(pool, "a", 1)
    assert isinstance(lease, Lease)
    await slots._beat(MODEL)
    # Its deadline in the past (no wait for Redis' clock): the next call sweeps it.
    await slots.backend.redis.zadd(slots._pool_keys(pool)[0], {lease.id: 0})
    assert await slots.stats(pool) == PoolStats(0, 0)
    await slots._beat(MODEL)
    assert lost == [MODEL]
    assert restored == []
    assert await slots.stats(pool) == PoolStats(0, 0)
    await slots.release(lease, None)


async def test_release_racing_the_restoring_heartbeat_leaves_no_lease(
    slots_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After data loss, a release that reaches Redis after the heartbeat was built but
    before it ran finds nothing to drop, and the heartbeat then grants the lease again.
    The worker sees the restored lease is no longer held and releases it once more (that
    call follows the beat's reply, so it cannot be overtaken); were it to fail, nobody
    renews the lease and it lapses within the TTL."""
    restored: list[tuple[str, int]] = []
    slots = slots_for(
        lease_ttl_s=60.0,
        heartbeat_s=30.0,
        on_leases_restored=lambda m, n: restored.append((m, n)),
    )
    pool = Pool(MODEL, 1)
    lease = await slots.admit(pool, "a", 1)
    assert isinstance(lease, Lease)
    await slots._beat(MODEL)
    backend = slots.backend
    await conftest.drop_prefix(backend.redis, backend.prefix)
    run = backend.run
    raced: list[str] = []

    async def release_first(script: Any, keys: list[str], args: list[Any]) -> Any:
        if args[0] == "heartbeat" and not raced:
            raced.append(lease.id)
            await slots.release(lease, None)  # at Redis first, the beat already built
        return await run(script, keys, args)

    monkeypatch.setattr(backend, "run", release_first)
    await slots._beat(MODEL)
    assert raced == [lease.id]
    await until(lambda: not slots._background)  # the second release has run
    assert restored == []  # given back, not counted as restored
    assert await slots.stats(pool) == PoolStats(0, 0)
    assert await _held_counts(backend, slots, pool) == []


# --- fail modes -----------------------------------------------------------------------


def _down_governor(fail_mode: str, clock: ManualClock) -> Governor:
    config = Config(
        demo_keys=True,
        backend="redis",
        admission=AdmissionConfig(fail_mode=fail_mode, fallback_workers=4),  # type: ignore[arg-type]
        models={MODEL: ModelEntry(concurrency=8), CLAUDE: ModelEntry(concurrency=8)},
    )
    dead = RedisConfig(url="redis://127.0.0.1:1/0", retries=0)
    backend = RedisBackend(dead, client=make_client(dead))
    return Governor(config, backend=backend, clock=clock, registry=CollectorRegistry())


async def test_fail_open_uses_a_fair_local_share(clock: ManualClock) -> None:
    """Redis down, fail_mode open: each worker allows limit // workers, marked degraded."""
    async with _down_governor("open", clock) as gov:
        app = KeyedApp()
        mw = AdmissionMiddleware(app, governor=gov)
        held = [asyncio.ensure_future(request(mw, t)) for t in ("a", "b")]
        await until(lambda: app.inside == 2)
        third = asyncio.ensure_future(request(mw, "c"))
        await queued(gov, 1)  # 8 slots // 4 workers = 2 here, not 8
        app.open("a", "b", "c")
        results = await asyncio.gather(*held, third)
        assert {r.status for r in results} == {200}
        first = results[0]
        assert first.header(h.DEGRADED) == "admission"
        assert first.header(h.CONCURRENCY_LIMIT) == "2"
        registry = gov.metrics.registry
        assert (
            registry.get_sample_value(
                "governor_admission_admitted_total", {"model": MODEL, "path": "degraded"}
            )
            == 3
        )


async def test_fail_closed_refuses_with_503_or_529(clock: ManualClock) -> None:
    """Redis down, fail_mode closed: 503 on OpenAI paths, 529 on Anthropic paths."""
    async with _down_governor("closed", clock) as gov:
        app = KeyedApp()
        mw = AdmissionMiddleware(app, governor=gov)
        openai = await request(mw, "a")
        assert openai.status == 503
        assert openai.json()["error"]["type"] == "service_unavailable_error"
        assert openai.header(h.DEGRADED) == "admission"
        assert openai.header("retry-after") == "1"
        anthropic = await request(mw, "b", model=CLAUDE)
        assert anthropic.status == 529
        assert anthropic.json()["error"]["type"] == "overloaded_error"
        assert app.order == []


# --- several processes ----------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.admission_worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


async def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).strip()


@pytest.fixture
async def shared_redis() -> AsyncIterator[tuple[RedisBackend, str]]:
    """The real Redis, under a prefix of this test's own."""
    client = await conftest.real_redis_or_skip()
    prefix = conftest.test_prefix()
    backend = RedisBackend(RedisConfig(url=conftest.REDIS_URL, key_prefix=prefix), client=client)
    try:
        yield backend, prefix
    finally:
        await conftest.drop_prefix(client, prefix)
        await client.aclose()


@pytest.mark.redis
async def test_processes_never_exceed_the_fleet_limit(
    shared_redis: tuple[RedisBackend, str],
) -> None:
    """Four processes, 40 concurrent acquires each, one limit of 5: never more than 5."""
    backend, prefix = shared_redis
    procs = [_spawn("stress", conftest.REDIS_URL, prefix, "5", "40") for _ in range(4)]
    try:
        for proc in procs:
            assert await _line(proc) == "ready"
        await backend.redis.rpush(backend.key("test", "go"), *["go"] * len(procs))
        reports = [json.loads(await _line(proc)) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert [r["done"] for r in reports] == [40] * 4
    assert 2 <= max(r["peak"] for r in reports) <= 5
    stats = await RedisSlots(backend).stats(Pool(MODEL, 5))
    assert (stats.held, stats.queued) == (0, 0)


@pytest.mark.redis
async def test_killed_worker_slots_come_back_within_ttl(
    shared_redis: tuple[RedisBackend, str],
) -> None:
    """SIGKILL a process holding every slot: its leases lapse within the TTL."""
    backend, prefix = shared_redis
    ttl = 1.0
    proc = _spawn("hold", conftest.REDIS_URL, prefix, "3", str(ttl))
    slots = RedisSlots(backend, QueueLimits(), lease_ttl_s=ttl, heartbeat_s=0.25, poll_s=0.05)
    try:
        assert await _line(proc) == "held"
        pool = Pool(MODEL, 3)
        assert (await slots.stats(pool)).held == 3
        waiter = await slots.admit(pool, "me", 1)
        assert not isinstance(waiter, Lease)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        lease = await asyncio.wait_for(waiter.wait(), 5)
        # Every dead lease lapses within the TTL; the margin covers the poll and a
        # busy CI machine.
        for _ in range(250):
            if (await slots.stats(pool)).held == 1:
                break
            await asyncio.sleep(0.02)
        assert time.monotonic() - killed < ttl + 0.75
        await slots.release(lease, None)
        assert (await slots.stats(pool)).held == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await slots.aclose()


@pytest.mark.redis
async def test_close_ends_the_subscriber_whenever_it_lands() -> None:
    """aclose() ends the wake-up subscriber even when its cancellation lands while the
    subscriber connects (redis-py's PubSub loses that one): never a hung shutdown."""
    await (await conftest.real_redis_or_skip()).aclose()
    for turns in range(0, 40, 3):
        config = RedisConfig(url=conftest.REDIS_URL, key_prefix=conftest.test_prefix())
        async with RedisBackend(config, client=make_client(config)) as backend:
            slots = RedisSlots(backend, QueueLimits())
            slots._start()  # what the first admit does
            for _ in range(turns):
                await asyncio.sleep(0)
            await asyncio.wait_for(slots.aclose(), timeout=10)
