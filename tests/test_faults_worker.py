"""A worker SIGKILLed mid-stream: what it held comes back within the lease; the ledger
stays consistent. The worker is a real process on the shared Redis, unique prefix."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from governor.config import AdmissionConfig
from tests.conftest import REDIS_URL, real_redis_or_skip
from tests.fault_support import (
    CHAT,
    OPENING,
    chat,
    drop_prefix,
    full_stack,
    make_config,
    new_prefix,
    wait_for,
)
from tests.faults_report import _Recorder

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
LEASE_S = 1.0


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = await real_redis_or_skip()
    yield client
    await client.aclose()


async def test_worker_killed_mid_stream(redis: Redis, faults: _Recorder) -> None:
    """The killed worker's reservation is released by its lease; nothing is charged."""
    prefix = new_prefix()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fault_worker",
        REDIS_URL,
        prefix,
        str(LEASE_S),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line.startswith(b"HOLDING"):
            assert proc.stderr is not None
            raise AssertionError((line, await proc.stderr.read()))
        config = make_config(
            redis_url=REDIS_URL,
            prefix=prefix,
            reservation_ttl_s=LEASE_S,
            admission=AdmissionConfig(lease_ttl_s=LEASE_S, heartbeat_s=LEASE_S / 3),
        )
        async with full_stack(config) as stack:
            _, held, live = await stack.ledger()
            assert held > 0
            assert live == 1
            assert await stack.slots() == (1, 0)  # the worker's slot, fleet-wide
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed = time.monotonic()

            async def released() -> bool:
                # Any reservation on the account reaps the expired ones first.
                result = await stack.call(CHAT, chat())
                assert result.status == 200, result.body
                _, held, live = await stack.ledger()
                return held == 0 and live == 0

            async def slot_back() -> bool:
                return await stack.slots() == (0, 0)

            await wait_for(slot_back, timeout=10, step=0.05)
            slot_s = time.monotonic() - killed
            await wait_for(released, timeout=10, step=0.1)
            recovery = time.monotonic() - killed
            balance, held, live = await stack.ledger()
            served = sum(1 for r in await stack.records() if r.outcome == "success")
            charge = (OPENING - balance) // max(served, 1)
            # Only this worker's own successful requests were charged, once each.
            assert OPENING - balance == served * charge
            assert slot_s <= LEASE_S + 1.5, slot_s
            assert recovery <= LEASE_S + 1.5, recovery
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await drop_prefix(redis, prefix)
    faults.record(
        "Worker SIGKILLed mid-stream",
        "admission slot and billing reservation (leases) / real process on Redis",
        "its slot and hold come back within the lease TTL; ledger consistent",
        f"slot back {slot_s:.2f} s and hold released {recovery:.2f} s after the kill "
        f"(leases {LEASE_S:.0f} s; the hold by the next reservation on the account); the "
        "killed request was never charged; 0 slots, 0 credits held",
        recovery_s=recovery,
    )
