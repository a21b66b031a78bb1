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


async def run_workers(prefix: str, limit: str) -> list[int]:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.billing_worker",
            REDIS_URL,
            prefix,
            limit,
            str(REQUESTS),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(PROCESSES)
    ]
    statuses: list[int] = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, err.decode()
        statuses += json.loads(out)
    return statuses


@pytest.mark.redis
@pytest.mark.parametrize("limit", ["balance", "hourly_budget", "spending_limit"])
async def test_processes_never_overspend(limit: str) -> None:
    """80 requests from 4 processes, 16 credits each, against 200 credits: exactly 12 pass."""
    client = await real_redis_or_skip()
    prefix = conftest.test_prefix()
    try:
        statuses = await run_workers(prefix, limit)
        assert statuses.count(200) == 12
        assert statuses.count(429) == PROCESSES * REQUESTS - 12
        async with RedisBackend(RedisConfig(url=REDIS_URL, key_prefix=prefix), client=client) as b:
            ledger = RedisLedger(b)
            spent = await ledger.spent("acme", key_id(KEY))
            assert spent.lifetime == 192
            if limit == "balance":
                assert await ledger.balance("acme", -1) == 8
    finally:
        await drop_prefix(client, prefix)
        await client.aclose()
