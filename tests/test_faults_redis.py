"""Redis faults against the full stack: down at start, killed under load, slow, flushed,
restarted. Redis sits behind tests/faultproxy.py (the shared server is never touched)
or is a throwaway redis-server this test kills. Each test records a row of docs/faults.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import pytest
from redis.asyncio import Redis

from governor import headers as h
from governor.admission import AdmissionMiddleware
from governor.admission.redis import RedisSlots
from governor.config import AdmissionConfig, ModelEntry, RateLimitConfig
from tests.conftest import REDIS_URL, real_redis_or_skip
from tests.fault_support import (
    CHAT,
    MESSAGES,
    OPENING,
    RedisServer,
    Stack,
    chat,
    drop_prefix,
    error_shape,
    full_stack,
    make_config,
    message,
    new_prefix,
    wait_for,
)
from tests.faultproxy import FaultProxy
from tests.faults_report import _Recorder
from tests.helpers import Result

pytestmark = pytest.mark.redis

GUARDS = ("fingerprint", "breaker", "ratelimit", "billing", "admission")
ALL_OPEN = {g: "open" for g in GUARDS}
DEGRADED = h.DEGRADED


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = await real_redis_or_skip()
    yield client
    await client.aclose()


@pytest.fixture
async def proxy(redis: Redis) -> AsyncIterator[FaultProxy]:
    url = urlparse(REDIS_URL)
    async with FaultProxy(url.hostname or "127.0.0.1", url.port or 6379) as p:
        yield p


def proxied(proxy: FaultProxy) -> str:
    return proxy.url + (urlparse(REDIS_URL).path or "/0")


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    name = new_prefix()
    yield name
    await drop_prefix(redis, name)


def degraded_gauges(stack: Stack) -> dict[str, float]:
    return {g: stack.metric("governor_degraded", guard=g) for g in (*GUARDS, "usage", "admission")}


async def recovered(stack: Stack, path: str = CHAT, body: Any = None) -> bool:
    """A request served with no guard degraded, and every degraded gauge back at 0."""
    result = await stack.call(path, body if body is not None else chat())
    if result.status != 200 or result.header(DEGRADED) is not None:
        return False
    return not any(degraded_gauges(stack).values())


async def ledger_settled(stack: Stack) -> tuple[int, int, int]:
    """The ledger, asserting no credit is held, and no slot held or queued."""
    balance, held, live = await stack.ledger()
    assert held == 0, f"{held} credits still held"
    assert live == 0, f"{live} reservations still live"
    assert await stack.slots() == (0, 0), "slots still held or queued"
    return balance, held, live


async def no_slots(stack: Stack) -> bool:
    return await stack.slots() == (0, 0)


async def recover(proxy: FaultProxy, stack: Stack, *, slots: bool = False) -> float:
    """Let Redis through again: seconds until the stack serves normally (and, with
    *slots*, holds no slot)."""
    proxy.restore()
    t0 = time.monotonic()
    await wait_for(lambda: recovered(stack))
    if slots:
        await wait_for(lambda: no_slots(stack))
    return time.monotonic() - t0


async def charge_of(stack: Stack, body: Any, path: str = CHAT) -> int:
    """What one such request is charged (measured on a healthy stack)."""
    before, _, _ = await stack.ledger()
    result = await stack.call(path, body)
    assert result.status == 200, result.body
    after, _, _ = await ledger_settled(stack)
    return before - after


# --- down at start ------------------------------------------------------------------


async def test_down_at_start_fail_open_holds_fair_share(
    proxy: FaultProxy, prefix: str, faults: _Recorder
) -> None:
    """Redis down from the start, every guard open: served at a fair share, said degraded."""
    proxy.kill()
    config = make_config(
        redis_url=proxied(proxy),
        prefix=prefix,
        fail=ALL_OPEN,
        rpm=8,
        ratelimit=RateLimitConfig(fallback_workers=4),
    )
    # The local fallback's sliding window (limits') weighs the previous wall-clock minute
    # by what is left of it: four requests astride a minute boundary may rightly admit a
    # third. Start clear of one.
    left = 60 - time.time() % 60
    if left < 3:
        await asyncio.sleep(left + 0.05)
    async with full_stack(config) as stack:
        results = [await stack.call(CHAT, chat()) for _ in range(4)]
        statuses = [r.status for r in results]
        # The model's fleet RPM of 8 over 4 workers: 2 per worker, never 8.
        assert statuses == [200, 200, 429, 429], statuses
        assert error_shape(results[2], CHAT) is None
        assert results[0].header(DEGRADED) == "fingerprint,breaker,ratelimit,billing,admission"
        # Slots too at a fair share: the model's 80 over admission.fallback_workers = 4.
        assert results[0].header(h.CONCURRENCY_LIMIT) == "20"
        assert results[0].json()["choices"][0]["message"]["content"]
        gauges = degraded_gauges(stack)
        assert all(gauges[g] == 1 for g in GUARDS), gauges
        assert stack.metric("governor_degraded_requests_total", guard="billing", mode="open") >= 2
        recovery = await recover(proxy, stack)
        charge = await charge_of(stack, chat())
        balance, _, _ = await ledger_settled(stack)
        # Served unbilled while down (fail open); billed once each after recovery.
        assert (OPENING - balance) % charge == 0
    faults.record(
        "Redis down at start (fail_mode=open everywhere)",
        "all guards / proxy refuses connections",
        "served; local limits at limit // fallback_workers; degraded header + gauge",
        "model RPM 8 held at 2 per worker (2 served, then 429 in shape); slots at "
        "concurrency // 4; header `fingerprint,breaker,ratelimit,billing,admission`; "
        "gauges 1 then 0; served unbilled while down; 0 slots held after",
        recovery_s=recovery,
    )


CLOSED_REASONS = {
    "fingerprint": "Client checks are unavailable",
    "breaker": "circuit breaker cannot reach its shared state",
    "ratelimit": "Rate limits cannot be checked",
    "billing": "Billing is temporarily unavailable",
    "admission": "Admission control cannot reach its shared state",
}


@pytest.mark.parametrize("guard", GUARDS)
async def test_down_at_start_fail_closed(
    proxy: FaultProxy, prefix: str, guard: str, faults: _Recorder
) -> None:
    """A guard failing closed answers 503 (OpenAI) / 529 (Anthropic), clearly, taking nothing."""
    proxy.kill()
    fail = {**ALL_OPEN, guard: "closed"}
    config = make_config(redis_url=proxied(proxy), prefix=prefix, fail=fail)
    async with full_stack(config) as stack:
        oai = await stack.call(CHAT, chat())
        ant = await stack.call(MESSAGES, message())
        assert (oai.status, ant.status) == (503, 529), (oai.body, ant.body)
        for result, path in ((oai, CHAT), (ant, MESSAGES)):
            assert error_shape(result, path) is None
            assert result.header("retry-after") is not None
            assert guard in (result.header(DEGRADED) or "")
        assert CLOSED_REASONS[guard] in oai.json()["error"]["message"]
        assert ant.json()["error"]["type"] == "overloaded_error"
        assert len(stack.mock.requests) == 0
        records = await stack.records()
        assert [r.outcome for r in records] == ["refused", "refused"]
        recovery = await recover(proxy, stack)
        charge = await charge_of(stack, chat())
        balance, _, _ = await ledger_settled(stack)
        # Nothing was charged for the refusals: only the successful requests since.
        assert (OPENING - balance) % charge == 0
        served = sum(1 for r in await stack.records() if r.outcome == "success")
        assert OPENING - balance == served * charge
    faults.record(
        f"Redis down at start ({guard}.fail_mode=closed)",
        f"{guard} / proxy refuses connections",
        "503 (OpenAI) / 529 overloaded_error (Anthropic), Retry-After, clear message",
        f'503/529 in the caller\'s shape: "{CLOSED_REASONS[guard]}..."; nothing reached '
        "the upstream; usage records `refused`; no credit held or charged",
        recovery_s=recovery,
    )


# --- killed under load --------------------------------------------------------------


async def test_killed_under_load(
    redis: Redis, proxy: FaultProxy, prefix: str, faults: _Recorder
) -> None:
    """Redis cut while streams are in flight: streams finish, settle once Redis is back."""
    config = make_config(redis_url=proxied(proxy), prefix=prefix, usage_sink="redis")
    streams = 8
    slow = {"x-mock-chunk-delay-ms": "100"}
    async with full_stack(config) as stack:
        charge = await charge_of(stack, chat(stream=True))
        charge_n = await charge_of(stack, chat())
        started: set[int] = set()
        all_started = asyncio.Event()

        def watcher(i: int) -> Any:
            def seen(messages: list[Any]) -> bool:
                if any(m.get("body") for m in messages if m["type"] == "http.response.body"):
                    started.add(i)
                    if len(started) == streams:
                        all_started.set()
                return False

            return seen

        tasks = [
            asyncio.create_task(
                stack.call(CHAT, chat(stream=True), headers=slow, disconnect=watcher(i))
            )
            for i in range(streams)
        ]
        await asyncio.wait_for(all_started.wait(), 10)
        proxy.kill()
        during = [await stack.call(CHAT, chat()) for _ in range(5)]
        results: list[Result] = await asyncio.gather(*tasks)
        for r in results:
            assert r.status == 200
            assert b"[DONE]" in r.body  # the stream itself never noticed
        for r in during:  # billing fails closed by default
            assert r.status == 503, r.body
            assert error_shape(r, CHAT) is None
            assert "billing" in (r.header(DEGRADED) or "")
        assert stack.metric("governor_degraded", guard="billing") == 1
        # The streams' slots could not be released while Redis was down.
        failed_releases = stack.metric("governor_admission_backend_errors_total", op="release")
        assert 1 <= failed_releases <= streams
        recovery = await recover(proxy, stack, slots=True)
        balance, _, _ = await ledger_settled(stack)
        plain = sum(1 for r in await stack.records() if r.outcome == "success" and not r.stream)
        expected = (1 + streams) * charge + plain * charge_n
        # Every success charged exactly once, the streams settled after Redis came back.
        assert OPENING - balance == expected, (OPENING - balance, expected)
        # The streams that ended while Redis was down settled by a retry (under load a
        # stream may end before the cut and settle directly; the ledger is exact either way).
        retried = stack.metric("governor_billing_settle_retries_total", result="settled")
        assert 1 <= retried <= streams
        # Every usage record reached Redis: the ones written while it was down too.
        ids = {r.header(h.REQUEST_ID) for r in [*results, *during]}
        recorded = {r.request_id for r in await stack.records()}
        assert ids <= recorded, ids - recorded
    faults.record(
        "Redis killed under load (8 streams in flight)",
        "billing (closed), ratelimit/breaker/fingerprint (open), usage sink redis",
        "streams finish; new requests 503; settlements retried; records buffered",
        f"8/8 streams completed; 5/5 new requests 503 in shape; {retried:.0f} settlements "
        f"and {failed_releases:.0f} slot releases retried once Redis was back: every "
        f"success charged once ({charge} credits each), 0 credits or slots held; every "
        "usage record in Redis",
        recovery_s=recovery,
    )


async def test_killed_while_requests_queue(
    proxy: FaultProxy, prefix: str, faults: _Recorder
) -> None:
    """Redis cut while requests wait for a slot: they finish locally; no slot stuck."""
    config = make_config(
        redis_url=proxied(proxy),
        prefix=prefix,
        fail=ALL_OPEN,
        models={"gpt-5-5": ModelEntry(concurrency=2)},
        admission=AdmissionConfig(max_wait_s=5.0, fallback_workers=2),
    )
    slow = {"x-mock-chunk-delay-ms": "60"}
    async with full_stack(config) as stack:
        first = asyncio.Event()

        def seen(messages: list[Any]) -> bool:
            if any(m.get("body") for m in messages if m["type"] == "http.response.body"):
                first.set()
            return False

        holders = [
            asyncio.create_task(stack.call(CHAT, chat(stream=True), headers=slow, disconnect=seen))
            for _ in range(2)
        ]
        await asyncio.wait_for(first.wait(), 5)
        waiters = [asyncio.create_task(stack.call(CHAT, chat())) for _ in range(3)]

        async def queued() -> bool:
            return (await stack.slots())[1] == 3

        await wait_for(queued, timeout=5, step=0.005)
        proxy.kill()
        results: list[Result] = await asyncio.gather(*holders, *waiters)
        statuses = sorted(r.status for r in results)
        for r in results:
            if r.status != 200:
                assert error_shape(r, CHAT) is None
        # Every waiter was served: locally, at the fair share of 2 // 2 = 1 slot.
        assert statuses == [200] * 5, statuses
        assert all("admission" in (r.header(DEGRADED) or "") for r in results[2:])
        recovery = await recover(proxy, stack, slots=True)
        await ledger_settled(stack)
    faults.record(
        "Redis killed while requests wait for a slot",
        "admission (open) / proxy cuts every connection",
        "waiters finish on local slots at a fair share; no slot stuck after",
        "2 streams and 3 queued requests all served (the waiters locally, one at a time: "
        "concurrency 2 // 2 workers); 0 slots held or queued and 0 credits held after",
        recovery_s=recovery,
    )


# --- slow ----------------------------------------------------------------------------


async def test_slow_redis(proxy: FaultProxy, prefix: str, faults: _Recorder) -> None:
    """Redis slower than the socket timeout: bounded latency, no stuck reservation."""
    config = make_config(redis_url=proxied(proxy), prefix=prefix, fail=ALL_OPEN, timeout_s=0.25)
    async with full_stack(config) as stack:
        await charge_of(stack, chat())
        proxy.delay = 0.4  # per chunk each way, above the 0.25 s socket timeout
        latencies = []
        for _ in range(2):
            t = time.monotonic()
            r = await stack.call(CHAT, chat())
            latencies.append(time.monotonic() - t)
            assert r.status == 200, r.body
            assert r.header(DEGRADED) is not None
        # Bounded by the timeouts (one retry each; settlement included), not by Redis:
        # about 1.5 s on an idle machine; the bound leaves room for a loaded CI box.
        assert max(latencies) < 6.0, latencies
        proxy.delay = 0.0
        t0 = time.monotonic()
        await wait_for(lambda: recovered(stack))
        recovery = time.monotonic() - t0
        # Reserve calls given up on mid-flight were cancelled by id: nothing stays held.
        await wait_for(lambda: _no_holds(stack))
        await ledger_settled(stack)
        cancelled = stack.metric("governor_billing_settle_retries_total", result="cancelled")
    faults.record(
        "Redis slow (0.4 s per reply, socket timeout 0.25 s)",
        "all guards (open) / delaying proxy",
        "latency bounded by the timeouts; fail mode applies; no reservation stuck",
        f"served in at most {max(latencies):.2f} s, marked degraded; {cancelled:.0f} reserve "
        "calls that timed out were cancelled by id; 0 credits held after",
        recovery_s=recovery,
    )


async def _no_holds(stack: Stack) -> bool:
    _, held, live = await stack.ledger()
    return held == 0 and live == 0


# --- flushed ---------------------------------------------------------------------------


async def test_flushed_keeps_suspension(
    redis: Redis, proxy: FaultProxy, prefix: str, faults: _Recorder
) -> None:
    """Redis loses every key mid-stream: a suspension this worker knew is written back,
    never lifted; the next heartbeat counts the stream's slot again; the stream settles;
    no slot or hold is left behind."""
    from governor.fingerprint.store import Suspension
    from governor.keys import key_id
    from tests.fault_support import KEY

    config = make_config(redis_url=proxied(proxy), prefix=prefix)
    async with full_stack(config) as stack:
        first_chunk = asyncio.Event()

        def seen(messages: list[Any]) -> bool:
            if any(m.get("body") for m in messages if m["type"] == "http.response.body"):
                first_chunk.set()
            return False

        in_flight = asyncio.create_task(
            stack.call(
                # Slow enough to be in flight still at the heartbeat after the flush.
                CHAT,
                chat(stream=True),
                headers={"x-mock-chunk-delay-ms": "300"},
                disconnect=seen,
            )
        )
        await asyncio.wait_for(first_chunk.wait(), 5)
        kid = key_id(KEY)
        susp_key = f"{prefix}:fp:{{{kid}}}:susp"
        record = Suspension(key_id=kid, account="acme", reasons=("test",), at=time.time())
        await redis.set(susp_key, record.to_json())
        refused = await stack.call(CHAT, chat())
        assert refused.status == 403, refused.body
        assert error_shape(refused, CHAT) is None
        dropped = await drop_prefix(redis, prefix)
        assert dropped > 0
        t0 = time.monotonic()
        again = await stack.call(CHAT, chat())
        assert again.status == 403, again.body  # not lifted by the flush
        assert await redis.exists(susp_key) == 1  # written back
        recovery = time.monotonic() - t0
        # The worker's next heartbeat (run now, not heartbeat_s later) sees the pool's
        # epoch changed and grants the stream's lease again.
        admission = stack.layer(AdmissionMiddleware)
        assert isinstance(admission.slots, RedisSlots)
        await admission.slots._beat("gpt-5-5")
        assert not in_flight.done()
        assert await stack.slots() == (1, 0)
        restored = stack.metric("governor_admission_leases_restored_total", model="gpt-5-5")
        assert restored == 1
        streamed = await in_flight
        assert streamed.status == 200
        assert b"[DONE]" in streamed.body
        # The stream's hold vanished with the flush: its settlement charges the re-seeded
        # balance once; its slot, restored, is released; nothing negative, nothing stuck.
        balance, held, live = await stack.ledger()
        assert held == 0
        assert live == 0
        assert balance <= OPENING
        assert await stack.slots() == (0, 0)
    faults.record(
        "Redis flushed (every key of the prefix deleted) mid-stream",
        "fingerprint suspensions; billing ledger; admission slots; rate counters",
        "suspensions survive; in-flight slots counted again within one heartbeat; ledger "
        "and slots consistent (nothing negative or stuck)",
        "suspended key still 403 and its record written back (epoch changed); the "
        "in-flight stream's slot counted again by the next heartbeat (1 lease restored); "
        "it completed and settled once; 0 slots and 0 credits held; "
        "balances restart at the opening balance and rate windows restart (a flush "
        "loses them: run Redis with persistence)",
        recovery_s=recovery,
    )


# --- restarted --------------------------------------------------------------------------


@pytest.mark.slow
async def test_restarted(faults: _Recorder) -> None:
    """redis-server SIGKILLed under load and started again empty: governor recovers alone."""
    server = RedisServer()
    await server.start()
    try:
        config = make_config(redis_url=server.url, prefix="gov", fail={"billing": "closed"})
        async with full_stack(config) as stack:
            charge = await charge_of(stack, chat())
            stream_charge = await charge_of(stack, chat(stream=True))
            slow = {"x-mock-chunk-delay-ms": "40"}
            first_chunk = asyncio.Event()

            def seen(messages: list[Any]) -> bool:
                if any(m.get("body") for m in messages if m["type"] == "http.response.body"):
                    first_chunk.set()
                return False

            task = asyncio.create_task(
                stack.call(CHAT, chat(stream=True), headers=slow, disconnect=seen)
            )
            await asyncio.wait_for(first_chunk.wait(), 10)
            await server.kill()
            down = await stack.call(CHAT, chat())
            assert down.status == 503
            assert error_shape(down, CHAT) is None
            streamed = await task
            assert streamed.status == 200
            assert b"[DONE]" in streamed.body
            await server.start()
            t0 = time.monotonic()
            await wait_for(lambda: recovered(stack))
            recovery = time.monotonic() - t0
            balance, _, _ = await ledger_settled(stack)
            # The restart lost the ledger (no persistence); the stream settled into the
            # fresh one, once; the requests since were charged once each.
            plain = sum(1 for r in await stack.records() if r.outcome == "success" and not r.stream)
            assert OPENING - balance == (plain - 1) * charge + stream_charge
    finally:
        await server.kill()
    faults.record(
        "Redis restarted (SIGKILL, started again empty)",
        "all guards / throwaway redis-server",
        "503 while down (billing closed); recovers by itself; no double charge",
        "503 in shape while down; in-flight stream completed and settled once into the "
        "restarted ledger; scripts reloaded by themselves (EVALSHA -> NOSCRIPT -> EVAL)",
        recovery_s=recovery,
    )
