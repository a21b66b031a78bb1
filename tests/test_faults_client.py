"""Clients that leave at every stage: nothing leaks, reservations settle, a usage record
is written (memory, fakeredis and the real Redis)."""

from __future__ import annotations

import asyncio
from typing import Any

from governor.backends import Backend
from governor.config import ModelEntry
from tests.fault_support import CHAT, OPENING, chat, full_stack, make_config, wait_for
from tests.faults_report import _Recorder


def kind(backend: Backend) -> str:
    """memory, fakeredis or redis."""
    if backend.kind == "memory":
        return "memory"
    return "fakeredis" if "fake" in type(backend.redis).__module__ else "redis"


async def settled(stack: Any) -> None:
    balance, held, live = await stack.ledger()
    assert (balance, held, live) == (OPENING, 0, 0)
    assert await stack.slots() == (0, 0)


async def test_disconnect_before_first_byte(backend: Backend, faults: _Recorder) -> None:
    """The client leaves while the upstream thinks: upstream call closed, nothing charged."""
    async with full_stack(make_config(), backend=backend) as stack:
        gone = asyncio.Event()
        task = asyncio.create_task(
            stack.call(CHAT, chat(), headers={"x-mock-first-byte-ms": "5000"}, gone=gone)
        )
        await asyncio.wait_for(stack.mock.arrived.wait(), 5)
        gone.set()
        result = await asyncio.wait_for(task, 5)
        assert result.status == 0  # nothing was sent to a client that left
        await asyncio.wait_for(stack.mock.left.wait(), 5)  # the upstream call was closed
        await settled(stack)
        (record,) = await stack.records()
        assert record.outcome == "disconnected"
        assert record.credits_charged == 0
        assert (
            stack.metric(
                "governor_breaker_outcomes_total",
                model="gpt-5-5",
                upstream="openai",
                verdict="neutral",
            )
            == 1
        )
    faults.record(
        "Client disconnects before the first byte",
        f"billing, breaker, usage log / {kind(backend)}",
        "upstream call closed; slot and hold released; record `disconnected`; breaker neutral",
        "upstream saw the disconnect; 0 slots and 0 credits held, 0 charged; one usage "
        "record `disconnected`; breaker counted it neutral",
    )


async def test_disconnect_mid_stream(backend: Backend, faults: _Recorder) -> None:
    """The client leaves after two chunks: nothing charged, record written, nothing held."""
    async with full_stack(make_config(), backend=backend) as stack:

        def after_two(messages: list[Any]) -> bool:
            return sum(1 for m in messages if m["type"] == "http.response.body") >= 2

        result = await stack.call(
            CHAT,
            chat(stream=True),
            headers={"x-mock-chunk-delay-ms": "50", "x-mock-chunks": "8"},
            disconnect=after_two,
        )
        assert result.status == 200
        assert b"[DONE]" not in result.body
        await asyncio.wait_for(stack.mock.left.wait(), 5)
        await settled(stack)
        (record,) = await stack.records()
        assert record.outcome == "disconnected"
        assert record.credits_charged == 0
    faults.record(
        "Client disconnects mid-stream",
        f"billing, usage log / {kind(backend)}",
        "upstream stream closed; slot and hold released (not charged); record",
        "upstream saw the disconnect; 0 slots and 0 credits held, 0 charged; one usage "
        "record `disconnected`",
    )


async def test_disconnect_while_queued(backend: Backend, faults: _Recorder) -> None:
    """A client leaving the queue takes no slot with it and holds nothing; recorded."""
    config = make_config(models={"gpt-5-5": ModelEntry(concurrency=1)})
    async with full_stack(config, backend=backend) as stack:
        first_chunk = asyncio.Event()

        def seen(messages: list[Any]) -> bool:
            if any(m.get("body") for m in messages if m["type"] == "http.response.body"):
                first_chunk.set()
            return False

        holder = asyncio.create_task(
            stack.call(
                CHAT, chat(stream=True), headers={"x-mock-chunk-delay-ms": "100"}, disconnect=seen
            )
        )
        await asyncio.wait_for(first_chunk.wait(), 5)
        gone = asyncio.Event()
        queued = asyncio.create_task(stack.call(CHAT, chat(), gone=gone))

        async def in_queue() -> bool:
            return await stack.slots() == (1, 1)

        await wait_for(in_queue, timeout=5, step=0.005)
        gone.set()
        left = await asyncio.wait_for(queued, 5)
        assert left.status == 0  # nothing sent to a client that left
        assert await stack.slots() == (1, 0)  # it left the queue and took no slot
        assert (await holder).status == 200
        after = await stack.call(CHAT, chat())
        assert after.status == 200
        assert int(after.header("X-Hypereal-Managed-Queue-Wait-Ms") or 0) < 100  # no wait
        assert len(stack.mock.requests) == 2  # the one that left never reached upstream
        assert await stack.slots() == (0, 0)
        _, held, live = await stack.ledger()
        assert (held, live) == (0, 0)
        outcomes = [r.outcome for r in await stack.records()]
        assert outcomes.count("disconnected") == 1
    faults.record(
        "Client disconnects while queued",
        f"admission, billing, usage log / {kind(backend)}",
        "leaves the queue at once; no slot leaked; hold released; record",
        "left the queue at once (1 held, 0 queued); next request admitted without "
        "waiting; never reached the upstream; 0 credits held; record `disconnected`",
    )
