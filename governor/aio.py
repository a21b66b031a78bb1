"""Running clean-up to its end, cheaply, whatever happens to the request's task.

Every governor layer gives back what it took in a ``finally``. That clean-up must not be
cut short by a cancellation (a client that left, a server shutting down), and the usual
tool, ``asyncio.shield(create_task(...))``, costs a task and two turns of the event loop
per request even when the clean-up never waits (the memory backends never do).

:func:`finish` drives the coroutine by hand first. A cancellation can only land where a
coroutine suspends, so one that returns without suspending has run to its end and no
task is made. One that suspends (a Redis round trip) is handed over, mid-flight, to a
task of its own, which the caller awaits through a shield: cancelling the caller leaves
the clean-up running.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable, Collection, Coroutine, Generator
from typing import Any, TypeVar, cast

_T = TypeVar("_T")

log = logging.getLogger(__name__)

# Clean-up tasks still running; kept referenced so they are not collected mid-way.
_BACKGROUND: set[asyncio.Task[Any]] = set()


@types.coroutine
def _resume(coro: Coroutine[Any, Any, _T], yielded: Any) -> Generator[Any, Any, _T]:
    """Go on driving *coro*, which has already yielded *yielded*, inside a task.

    This is what ``await`` does (``yield from``), started one step late: the future the
    coroutine waits on passes up to the task unchanged, and what the task sends or
    throws goes back down.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def _continue(coro: Coroutine[Any, Any, _T], yielded: Any) -> _T:
    return await _resume(coro, yielded)


def spawn(coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """*coro* as a task kept alive until it ends, even if its request is gone."""
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


def _begin(coro: Coroutine[Any, Any, _T]) -> tuple[asyncio.Task[_T] | None, _T | None]:
    """Drive *coro* inline to its first wait: ``(None, result)`` when it ended without
    one, else ``(the task it goes on in, None)``."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return None, stop.value
    return spawn(_continue(coro, yielded)), None


async def finish(
    coro: Coroutine[Any, Any, _T],
    *,
    on_task: Callable[[asyncio.Task[_T]], None] | None = None,
) -> _T:
    """Run *coro* to its end even if the calling task is cancelled meanwhile.

    *on_task* is told of the task when one was needed, so that another layer can wait
    for the clean-up to end.
    """
    task, result = _begin(coro)
    if task is None:
        return cast(_T, result)
    if on_task is not None:
        on_task(task)
    return await asyncio.shield(task)


def start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Start *coro* now, inline until it first waits, and let it run on unawaited.

    None when it ended without waiting; otherwise the task it goes on in (kept alive
    even if nobody awaits it), to await later through :func:`asyncio.shield`. Used to
    begin a clean-up before passing a message on, so that its Redis call is sent in the
    same loop turn (the same auto-pipelined round trip) as what the next layer does.
    """
    return _begin(coro)[0]


async def cancel_all(
    tasks: Collection[asyncio.Future[Any]], *, every_s: float = 0.5, rounds: int = 20
) -> None:
    """Cancel *tasks* and wait for them to end, cancelling again every *every_s*.

    One cancellation is not always enough: redis-py's asyncio ``PubSub`` loses one that
    lands while it connects, then waits in ``get_message(timeout=None)`` for good (seen
    with redis-py 8.1). After *rounds* tries the rest are left running, with a warning,
    rather than hang a shutdown.
    """
    pending = {task for task in tasks if not task.done()}
    for _ in range(rounds):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
    if pending:
        log.warning("%d background task(s) ignored cancellation: left running", len(pending))
