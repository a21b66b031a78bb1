"""Several real processes sharing one Redis never overspend a balance or a budget."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from governor.backends import RedisBackend
from governor.billing import RedisLedger
from governor.config import RedisConfig
from governor.keys import key_id
from tests import conftest
from tests.billing_apps import KEY
from tests.conftest import REDIS_URL, drop_prefix, real_redis_or_skip

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 4
REQUESTS = 20


LIMITS = ["balance", "hourly_budget", "daily_budget", "spending_limit"]


async def run_workers(prefix: str) -> dict[str, list[int]]:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.billing_worker",
            REDIS_URL,
            prefix,
            str(REQUESTS),
            str(PROCESSES),
            *LIMITS,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(PROCESSES)
    ]
    statuses: dict[str, list[int]] = {limit: [] for limit in LIMITS}
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, err.decode()
        for limit, got in json.loads(out).items():
            statuses[limit] += got
    return statuses


@pytest.mark.redis
async def test_processes_never_overspend() -> None:
    """80 requests from 4 processes, 16 credits each, against 200 credits of a balance
    or a budget: exactly 12 pass, and exactly 192 credits are spent."""
    client = await real_redis_or_skip()
    prefix = conftest.test_prefix()
    try:
        statuses = await run_workers(prefix)
        for limit in LIMITS:
            assert statuses[limit].count(200) == 12, limit
            assert statuses[limit].count(429) == PROCESSES * REQUESTS - 12, limit
            config = RedisConfig(url=REDIS_URL, key_prefix=f"{prefix}-{limit}")
            async with RedisBackend(config, client=client) as b:
                ledger = RedisLedger(b)
                assert (await ledger.spent("acme", key_id(KEY))).lifetime == 192
                if limit == "balance":
                    assert await ledger.balance("acme", -1) == 8
    finally:
        for limit in LIMITS:
            await drop_prefix(client, f"{prefix}-{limit}")
        await client.aclose()
