"""finish(): clean-up that runs to its end, without a task when it never waits."""

from __future__ import annotations

import asyncio

import pytest

from governor.aio import cancel_all, finish, start


async def test_no_task_when_nothing_waits() -> None:
    """A coroutine that never suspends runs inline: no task is made."""
    made: list[asyncio.Task[int]] = []

    async def quick() -> int:
        return 7

    assert await finish(quick(), on_task=made.append) == 7
    assert made == []


async def test_waiting_coroutine_continues_in_a_task() -> None:
    """A coroutine that suspends is handed to a task and its result comes back."""
    gate = asyncio.Event()
    made: list[asyncio.Task[int]] = []

    async def slow() -> int:
        await gate.wait()
        await asyncio.sleep(0)
        return 9

    waiter = asyncio.ensure_future(finish(slow(), on_task=made.append))
    await asyncio.sleep(0)
    assert len(made) == 1
    gate.set()
    assert await waiter == 9


async def test_cancelling_the_caller_leaves_the_clean_up_running() -> None:
    """The caller is cancelled while waiting; the clean-up still reaches its end."""
    gate = asyncio.Event()
    done: list[str] = []

    async def clean_up() -> None:
        await gate.wait()
        done.append("released")

    waiter = asyncio.ensure_future(finish(clean_up()))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert done == ["released"]


async def test_exceptions_propagate() -> None:
    """An exception raised before or after suspending reaches the caller."""

    async def early() -> None:
        raise ValueError("early")

    async def late() -> None:
        await asyncio.sleep(0)
        raise KeyError("late")

    with pytest.raises(ValueError, match="early"):
        await finish(early())
    with pytest.raises(KeyError):
        await finish(late())


async def test_exception_thrown_into_the_task_reaches_the_coroutine() -> None:
    """Cancelling the clean-up task itself cancels the coroutine where it waits."""
    made: list[asyncio.Task[None]] = []
    seen: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    waiter = asyncio.ensure_future(finish(waits(), on_task=made.append))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # let the clean-up task take its first step
    made[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert seen == ["cancelled"]


async def test_start_runs_inline_until_the_first_wait() -> None:
    """start(): a coroutine that never waits is done at once (no task); one that waits
    goes on in a task that ends even if nobody awaits it."""
    ran: list[str] = []

    async def quick() -> None:
        ran.append("quick")

    assert start(quick()) is None
    assert ran == ["quick"]

    gate = asyncio.Event()

    async def slow() -> None:
        ran.append("slow began")
        await gate.wait()
        ran.append("slow ended")

    task = start(slow())
    assert task is not None
    assert ran[-1] == "slow began"  # its first step ran inline, before start() returned
    gate.set()
    await asyncio.shield(task)
    assert ran[-1] == "slow ended"


async def test_cancel_all_cancels_again_until_the_task_ends() -> None:
    """A task that swallows its first cancellation still ends (redis-py's PubSub can)."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # lost, as redis-py loses one that lands while it connects
        await asyncio.Event().wait()

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    await cancel_all([task], every_s=0.01)
    assert swallowed.is_set()
    assert task.cancelled()
