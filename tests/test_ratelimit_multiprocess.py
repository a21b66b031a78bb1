"""Several processes sharing one real Redis hold every limit exactly."""

from __future__ import annotations

import multiprocessing

import pytest

from governor.config import ModelEntry
from governor.tokens import estimate_input_tokens
from tests import conftest
from tests.conftest import REDIS_URL, drop_prefix, real_redis_or_skip
from tests.ratelimit_worker import BODY, run

PROCESSES = 3
PER_PROCESS = 100
LIMIT = 150
COST = estimate_input_tokens(BODY) + 100

CASES = [
    pytest.param(ModelEntry(rpm=LIMIT), id="rpm"),
    pytest.param(ModelEntry(tpm=LIMIT * COST), id="tpm"),
]


@pytest.mark.redis
@pytest.mark.parametrize("model", CASES)
async def test_processes_share_one_limit_exactly(model: ModelEntry) -> None:
    """3 processes x 100 concurrent requests on one limit of 150: exactly 150 admitted."""
    client = await real_redis_or_skip()
    prefix = conftest.test_prefix()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=run, args=(REDIS_URL, prefix, model, PER_PROCESS, barrier, out))
        for _ in range(PROCESSES)
    ]
    try:
        for p in procs:
            p.start()
        admitted = [out.get(timeout=60) for _ in procs]
        assert all(isinstance(n, int) for n in admitted), admitted
        for p in procs:
            p.join(timeout=10)
            assert p.exitcode == 0
        assert sum(admitted) == LIMIT
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        await drop_prefix(client, prefix)
        await client.aclose()
