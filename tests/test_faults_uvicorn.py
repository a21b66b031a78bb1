"""The demo gateway under uvicorn with two workers on Redis: both workers SIGKILLed
while streams are in flight. Their slots and holds come back within the lease TTL,
uvicorn starts new workers, and the gateway serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from examples.mock_upstream import MockUpstream
from examples.serving import serve
from governor.config import AdmissionConfig
from governor.keys import key_id
from tests.conftest import REDIS_URL, real_redis_or_skip
from tests.fault_support import (
    CHAT,
    chat,
    drop_prefix,
    free_port,
    full_stack,
    make_config,
    new_prefix,
    wait_for,
)
from tests.faults_report import _Recorder

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
LEASE_S = 2.0
DEMO_KEY = "ck_rel_uvicorn_demo"


def children(pid: int) -> list[int]:
    """The worker processes uvicorn's supervisor *pid* runs (not multiprocessing's
    resource tracker)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"resource_tracker" not in cmdline:
                out.append(int(child))
    return out


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = await real_redis_or_skip()
    yield client
    await client.aclose()


async def _healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
async def test_uvicorn_workers_killed_mid_stream(redis: Redis, faults: _Recorder) -> None:
    """SIGKILL of every uvicorn worker mid-stream: slots and holds back within the TTL."""
    prefix = new_prefix()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GOVERNOR_REDIS__KEY_PREFIX": prefix,
        "GOVERNOR_ADMISSION__LEASE_TTL_S": str(LEASE_S),
        "GOVERNOR_ADMISSION__HEARTBEAT_S": str(LEASE_S / 4),
        "GOVERNOR_BILLING__RESERVATION_TTL_S": str(LEASE_S),
    }
    mock = MockUpstream()
    async with serve(mock) as upstream, aiohttp.ClientSession() as session:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "demo_proxy.py"),
            "--workers",
            "2",
            "--redis-url",
            REDIS_URL,
            "--port",
            str(port),
            "--upstream",
            upstream,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        streams: list[aiohttp.ClientResponse] = []
        try:
            await wait_for(lambda: _healthy(session, url), timeout=30, step=0.1)
            headers = {
                "authorization": f"Bearer {DEMO_KEY}",
                "x-mock-chunk-delay-ms": "1000",
                "x-mock-chunks": "10",
            }
            for _ in range(4):
                r = await session.post(url + CHAT, json=chat(stream=True), headers=headers)
                assert r.status == 200
                await r.content.readany()  # the first chunk: the stream is under way
                streams.append(r)
            config = make_config(
                redis_url=REDIS_URL,
                prefix=prefix,
                reservation_ttl_s=LEASE_S,
                admission=AdmissionConfig(lease_ttl_s=LEASE_S, heartbeat_s=LEASE_S / 4),
                demo_keys=True,
            )
            async with full_stack(config) as stack:
                held, _ = await stack.slots()
                assert held == 4  # the demo workers' slots, fleet-wide
                workers = children(proc.pid or 0)
                assert len(workers) == 2
                for pid in workers:
                    os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                for r in streams:
                    with pytest.raises(aiohttp.ClientError):
                        await r.content.read()

                async def slots_back() -> bool:
                    return await stack.slots() == (0, 0)

                await wait_for(slots_back, timeout=10, step=0.05)
                slots_s = time.monotonic() - killed

                async def holds_back() -> bool:
                    # A reservation on the account reaps its expired holds first.
                    result = await stack.call(CHAT, chat(), key=DEMO_KEY)
                    assert result.status == 200, result.body
                    account = "demo-" + key_id(DEMO_KEY)[4:]
                    tag = "{" + account + "}"
                    held = await redis.hget(f"{prefix}:bill:{tag}:acct", "held")
                    return int(held or 0) == 0

                await wait_for(holds_back, timeout=10, step=0.1)
                holds_s = time.monotonic() - killed
                # uvicorn's supervisor starts new workers: the gateway serves again.
                await wait_for(lambda: _healthy(session, url), timeout=30, step=0.1)
                async with session.post(
                    url + CHAT, json=chat(), headers={"authorization": f"Bearer {DEMO_KEY}"}
                ) as again:
                    assert again.status == 200
                serving_s = time.monotonic() - killed
                assert slots_s <= LEASE_S + 2.0, slots_s
        finally:
            for r in streams:
                r.close()
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
            await drop_prefix(redis, prefix)
    faults.record(
        "uvicorn workers SIGKILLed mid-stream (demo, --workers 2, Redis)",
        "admission slots and billing holds (leases) / real uvicorn workers",
        "slots and holds come back within the lease TTL; uvicorn restarts the workers",
        f"4 streams cut; their 4 slots back after {slots_s:.2f} s and holds after "
        f"{holds_s:.2f} s (leases {LEASE_S:.0f} s); new workers serving after "
        f"{serving_s:.2f} s; nothing charged for the cut streams",
        recovery_s=serving_s,
    )
