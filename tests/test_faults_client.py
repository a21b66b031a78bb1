"""Clients that leave at every stage: nothing leaks, reservations settle, a usage record
is written (memory, fakeredis and the real Redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import governor
from governor.backends import Backend
from tests.fault_support import CHAT, OPENING, chat, full_stack, make_config
from tests.faults_report import _Recorder


def kind(backend: Backend) -> str:
    """memory, fakeredis or redis."""
    if backend.kind == "memory":
        return "memory"
    return "fakeredis" if "fake" in type(backend.redis).__module__ else "redis"


async def settled(stack: Any) -> None:
    balance, held, live = await stack.ledger()
    assert (balance, held, live) == (OPENING, 0, 0)


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
        "upstream call closed; hold released; record `disconnected`; breaker neutral",
        "upstream saw the disconnect; 0 credits charged or held; one usage record "
        "`disconnected`; breaker counted it neutral",
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
        "upstream stream closed; hold released (failed requests are not charged); record",
        "upstream saw the disconnect; 0 credits charged or held; one usage record `disconnected`",
    )


@pytest.mark.skipif(
    not hasattr(governor, "AdmissionMiddleware"), reason="admission (issue 4) not merged yet"
)
async def test_disconnect_while_queued(backend: Backend, faults: _Recorder) -> None:
    """A client leaving the queue takes no slot with it: the next request gets the slot."""
    from governor.config import ModelEntry

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
        await asyncio.sleep(0)  # let it reach the queue
        gone.set()
        await asyncio.wait_for(queued, 5)
        assert (await holder).status == 200
        after = await stack.call(CHAT, chat())
        assert after.status == 200
        assert len(stack.mock.requests) == 2  # the one that left never reached upstream
        _, held, live = await stack.ledger()
        assert (held, live) == (0, 0)
        outcomes = sorted(r.outcome for r in await stack.records())
        assert "disconnected" in outcomes or "refused" in outcomes
    faults.record(
        "Client disconnects while queued",
        f"admission / {kind(backend)}",
        "no slot leaked; no reservation left",
        "next request took the slot at once; the queued one never reached the upstream",
    )
