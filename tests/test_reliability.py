"""The pieces the fault suite needed in the capabilities: idempotent settlements,
cancelling a reservation whose reply was lost, the usage sink's backlog, one fail mode
per guard, the degraded metric and header."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from governor import Governor
from governor.backends import RedisBackend
from governor.billing.base import Limits, Refusal, Reservation
from governor.billing.redis import RedisLedger
from governor.config import Config, RedisConfig
from governor.degraded import degraded_for, header_value
from governor.usage_log.records import UsageRecord
from governor.usage_log.sinks import RedisStreamSink
from tests.conftest import REDIS_URL, drop_prefix, real_redis_or_skip
from tests.fault_support import new_prefix
from tests.faultproxy import FaultProxy

NO_LIMITS = Limits(None, None, None)


async def _reserve(ledger: RedisLedger, amount: int = 10) -> Reservation:
    result = await ledger.reserve("acct", "key", 1_000, amount, NO_LIMITS)
    assert isinstance(result, Reservation)
    return result


async def test_settle_is_idempotent(redis_backend: RedisBackend) -> None:
    """A settlement retried after a lost reply charges nothing twice."""
    ledger = RedisLedger(redis_backend)
    reservation = await _reserve(ledger)
    first = await ledger.settle(reservation, 7, NO_LIMITS)
    again = await ledger.settle(reservation, 7, NO_LIMITS)
    assert again == first
    assert await ledger.balance("acct", 1_000) == 993


async def test_settlement_records_expire_by_themselves(redis_backend: RedisBackend) -> None:
    """A settlement is remembered for twice the lease, then Redis forgets it (no sweep)."""
    ledger = RedisLedger(redis_backend, lease_s=60.0)
    reservation = await _reserve(ledger)
    await ledger.settle(reservation, 7, NO_LIMITS)
    ttl_ms = await redis_backend.redis.pttl(ledger._done_key("acct", reservation.id))
    assert 110_000 < ttl_ms <= 120_000


async def test_cancel_releases_a_reservation(redis_backend: RedisBackend) -> None:
    """Cancelling a reservation that did run releases its hold."""
    ledger = RedisLedger(redis_backend)
    reservation = await _reserve(ledger, 400)
    assert await ledger.cancel("acct", "key", reservation.id) is True
    assert (await ledger.spent("acct", "key")).lifetime == 0
    # The whole balance is available again.
    assert isinstance(await _reserve(ledger, 1_000), Reservation)


async def test_cancel_before_the_reserve_arrives(redis_backend: RedisBackend) -> None:
    """A reserve call that arrives after its cancellation holds nothing."""
    ledger = RedisLedger(redis_backend)
    assert await ledger.cancel("acct", "key", "late-id") is False
    keys = [*ledger._keys("acct", "key"), ledger._done_key("acct", "late-id")]
    prefix = redis_backend.key("bill", "{acct}", "key", "")
    reply = await redis_backend.run(
        ledger._reserve, keys, [1_000, 10, "late-id", "key", 60_000, -1, -1, -1, prefix]
    )
    assert reply[0] == 0
    assert reply[1] == b"cancelled"
    assert await ledger.balance("acct", 1_000) == 1_000
    assert isinstance(await _reserve(ledger, 1_000), Reservation)


def _record(n: int) -> UsageRecord:
    return UsageRecord(
        f"req_{n}", time.time(), "key_1", "acct", "gpt-5-5", "chat.completions", False,
        200, "success", None, 1, 1, 0, 0, 1, 1, 0, None, 1, None, None, "other",
    )  # fmt: skip


@pytest.fixture
async def real_redis() -> AsyncIterator[Redis]:
    client = await real_redis_or_skip()
    yield client
    await client.aclose()


@pytest.mark.redis
async def test_usage_backlog_written_when_redis_is_back(real_redis: Redis) -> None:
    """Records written while Redis is down wait in order and reach Redis afterwards."""
    prefix = new_prefix()
    async with FaultProxy() as proxy:
        db = REDIS_URL.rsplit("/", 1)[-1]
        config = RedisConfig(url=f"{proxy.url}/{db}", key_prefix=prefix, retries=0)
        async with RedisBackend(config) as backend:
            sink = RedisStreamSink(backend, backlog=3)
            await sink.write(_record(0))
            proxy.kill()
            await sink.write(_record(1))
            await sink.write(_record(2))
            assert sink.pending == 2
            proxy.restore()
            await sink.write(_record(3))
            assert sink.pending == 0
            ids = [r.request_id for r in reversed(await sink.recent("key_1", 10))]
    await drop_prefix(real_redis, prefix)
    assert ids == ["req_0", "req_1", "req_2", "req_3"]


def test_every_guard_has_a_fail_mode() -> None:
    """Each guard's config section names its fail mode the same way."""
    config = Config()
    for section in ("admission", "ratelimit", "breaker", "fingerprint", "billing"):
        assert getattr(config, section).fail_mode in ("open", "closed"), section
    assert Config().billing.fail_mode == "closed"
    assert dataclasses.replace(config.breaker, fail_mode="closed").fail_mode == "closed"


async def test_degraded_gauge_and_header() -> None:
    """mark() raises the guard's gauge and names it for the header; healthy() lowers it."""
    from governor.context import RequestContext

    registry = CollectorRegistry()
    gov = Governor(registry=registry)
    state = degraded_for(gov)
    ctx = RequestContext.__new__(RequestContext)
    object.__setattr__(ctx, "notes", {})
    state.mark(ctx, "ratelimit", "open")
    state.mark(ctx, "billing", "closed")
    state.mark(ctx, "ratelimit", "open")
    assert header_value(ctx) == b"ratelimit,billing"
    assert registry.get_sample_value("governor_degraded", {"guard": "ratelimit"}) == 1
    assert (
        registry.get_sample_value(
            "governor_degraded_requests_total", {"guard": "ratelimit", "mode": "open"}
        )
        == 2
    )
    state.healthy("ratelimit")
    assert registry.get_sample_value("governor_degraded", {"guard": "ratelimit"}) == 0
    assert isinstance(Refusal("x", 0, None), Refusal)


@pytest.mark.redis
async def test_usage_backlog_full_drops_oldest(real_redis: Redis) -> None:
    """Past its bound the backlog drops its oldest record and says so (BackendError)."""
    from governor.errors import BackendError

    prefix = new_prefix()
    async with FaultProxy() as proxy:
        db = REDIS_URL.rsplit("/", 1)[-1]
        config = RedisConfig(url=f"{proxy.url}/{db}", key_prefix=prefix, retries=0)
        async with RedisBackend(config) as backend:
            sink = RedisStreamSink(backend, backlog=1)
            proxy.kill()
            await sink.write(_record(1))
            with pytest.raises(BackendError):
                await sink.write(_record(2))
            assert sink.pending == 1
    await drop_prefix(real_redis, prefix)


async def test_cancels_share_one_drainer() -> None:
    """Reservations to cancel wait in one queue, drained once the ledger answers."""
    from governor.billing.base import ReserveUnknown
    from governor.billing.middleware import SettleRetries
    from governor.errors import BackendError

    class Ledger:
        def __init__(self) -> None:
            self.down = True
            self.cancelled: list[str] = []

        async def cancel(self, account: str, key_id: str, rid: str) -> bool:
            if self.down:
                raise BackendError("down")
            self.cancelled.append(rid)
            return True

    ledger = Ledger()
    gov = Governor(registry=CollectorRegistry())
    retries = SettleRetries(gov, ledger)  # type: ignore[arg-type]
    for i in range(50):
        retries.cancel(ReserveUnknown("lost", "acct", "key", f"r{i}"))
    assert len(retries.tasks) == 1
    ledger.down = False
    await retries.drain()
    assert ledger.cancelled == [f"r{i}" for i in range(50)]
    await gov.aclose()
