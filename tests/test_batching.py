"""Auto-pipelining: script calls of one event-loop turn travel as one batch."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from governor.backends import RedisBackend
from governor.backends.batching import ScriptBatcher, _pack, _pack_py
from governor.errors import BackendError


def batcher_of(backend: RedisBackend) -> ScriptBatcher:
    batcher = backend._batcher
    assert batcher is not None, "autopipeline is on by default"
    return batcher


async def test_calls_of_one_turn_share_one_batch(redis_backend: RedisBackend) -> None:
    """Ten calls started together cost one batch, and each gets its own reply."""
    script = redis_backend.script("tests", "probe.lua")
    keys = [redis_backend.key(f"b{i}") for i in range(10)]
    batcher = batcher_of(redis_backend)
    before = batcher.batches
    calls = (redis_backend.run(script, [k], [i]) for i, k in enumerate(keys))
    replies = await asyncio.gather(*calls)
    assert [r[0] for r in replies] == list(range(10))
    assert batcher.batches == before + 1


async def test_a_script_error_fails_only_its_own_call(redis_backend: RedisBackend) -> None:
    """INCRBY on a non-number fails that call; the others in the batch still succeed."""
    script = redis_backend.script("tests", "probe.lua")
    key = redis_backend.key("ok")
    results = await asyncio.gather(
        redis_backend.run(script, [key], [1]),
        redis_backend.run(script, [key], ["not-a-number"]),
        redis_backend.run(script, [key], [2]),
        return_exceptions=True,
    )
    assert isinstance(results[1], BackendError)
    assert [results[0][0], results[2][0]] == [1, 3]  # type: ignore[index]


async def test_a_flushed_script_is_loaded_again(redis_backend: RedisBackend) -> None:
    """After SCRIPT FLUSH (or a Redis restart) the batch loads the script and goes on."""
    script = redis_backend.script("tests", "probe.lua")
    key = redis_backend.key("flushed")
    await redis_backend.run(script, [key], [1])
    await redis_backend.redis.script_flush()
    replies = await asyncio.gather(*(redis_backend.run(script, [key], [1]) for _ in range(3)))
    assert sorted(r[0] for r in replies) == [2, 3, 4]


async def test_a_cancelled_caller_leaves_the_batch_whole(redis_backend: RedisBackend) -> None:
    """A caller that leaves mid-flight does not fail its neighbours; its script still ran."""
    script = redis_backend.script("tests", "probe.lua")
    key = redis_backend.key("cancel")
    leaving = asyncio.ensure_future(redis_backend.run(script, [key], [1]))
    staying = asyncio.ensure_future(redis_backend.run(script, [key], [1]))
    await asyncio.sleep(0)  # both submitted, the batch not yet sent
    leaving.cancel()
    assert (await staying)[0] in (1, 2)
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await batcher_of(redis_backend).aclose()
    assert await redis_backend.redis.get(key) == b"2"


async def test_unreachable_redis_fails_every_call_with_backend_error() -> None:
    from governor.backends.redis import make_client
    from governor.config import RedisConfig

    config = RedisConfig(url="redis://127.0.0.1:1/0", retries=0)
    async with RedisBackend(config, client=make_client(config)) as backend:
        script = backend.script("tests", "probe.lua")
        results = await asyncio.gather(
            *(backend.run(script, ["k"], [1]) for _ in range(3)), return_exceptions=True
        )
    assert all(isinstance(r, BackendError) for r in results)


async def test_autopipeline_can_be_turned_off(redis_backend: RedisBackend) -> None:
    config = dataclasses.replace(redis_backend.config, autopipeline=False)
    backend = RedisBackend(config, client=redis_backend.redis)
    assert backend._batcher is None
    script = backend.script("tests", "probe.lua")
    assert (await backend.run(script, [backend.key("off")], [7]))[0] == 7


@pytest.mark.parametrize("pack", [_pack, _pack_py], ids=["default", "python"])
def test_pack_writes_resp_as_redis_py_does(pack: Callable[[tuple[Any, ...]], bytes]) -> None:
    """Both packers (hiredis's when installed, and the pure-Python one) write the same RESP."""
    assert pack(("EVALSHA", "ab", 1, b"k", 0.5, -3, "é")) == (
        b"*7\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$3\r\n0.5\r\n"
        b"$2\r\n-3\r\n$2\r\n\xc3\xa9\r\n"
    )
    with pytest.raises(TypeError):
        pack(("EVALSHA", True))


async def test_slot_release_shares_the_settlement_round_trip(redis_backend: RedisBackend) -> None:
    """Admission gives the slot back as the upstream's last body passes, before billing
    settles: on Redis both go in one batch (4 script calls in 3 round trips)."""
    from governor import AdmissionMiddleware, BillingMiddleware, Governor
    from governor.config import Config
    from tests.apps import ok_app
    from tests.helpers import call

    batcher = batcher_of(redis_backend)
    async with Governor(Config(demo_keys=True), backend=redis_backend) as gov:
        app = BillingMiddleware(AdmissionMiddleware(ok_app, governor=gov), governor=gov)
        request = {"model": "gpt-5-5", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"authorization": "Bearer ck_batch"}
        await call(app, headers=auth, json_body=request)  # heartbeats and scripts started
        before = (batcher.batches, batcher.calls)
        result = await call(app, headers=auth, json_body=request)
        assert result.status == 200
        assert (batcher.batches - before[0], batcher.calls - before[1]) == (3, 4)


async def test_one_connection_is_kept_between_batches(redis_backend: RedisBackend) -> None:
    """Consecutive batches reuse one kept connection (the pool's get and release cost
    more than a command); closing gives it back to the pool."""
    script = redis_backend.script("tests", "probe.lua")
    batcher = batcher_of(redis_backend)
    await redis_backend.run(script, [redis_backend.key("kept")], [1])
    kept = batcher._idle
    assert kept is not None
    await redis_backend.run(script, [redis_backend.key("kept")], [1])
    assert batcher._idle is kept
    await batcher.aclose()
    assert batcher._idle is None
    pool: Any = redis_backend.redis.connection_pool
    assert kept in pool._available_connections


async def test_a_failed_batch_does_not_keep_its_connection(redis_backend: RedisBackend) -> None:
    """A connection that failed mid-batch goes back to the pool, disconnected."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    script = redis_backend.script("tests", "probe.lua")
    batcher = batcher_of(redis_backend)
    await redis_backend.run(script, [redis_backend.key("f")], [1])
    kept: Any = batcher._idle

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("reset by peer")

    kept.read_response = broken
    with pytest.raises(BackendError):
        await redis_backend.run(script, [redis_backend.key("f")], [1])
    assert batcher._idle is None
    del kept.read_response
