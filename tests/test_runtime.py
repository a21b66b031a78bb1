"""The Governor runtime: shared per-governor objects and closing them."""

from __future__ import annotations

import gc

from governor import Config, Governor, wrap
from tests.apps import ok_app
from tests.helpers import auth, call


class Closable:
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name

    async def aclose(self) -> None:
        self.log.append(self.name)


async def test_shared_is_built_once() -> None:
    """The factory runs on first use only; later calls get the same object."""
    gov = Governor()
    built: list[int] = []

    def factory() -> object:
        built.append(1)
        return object()

    assert gov.shared("x", factory) is gov.shared("x", factory)
    assert built == [1]


async def test_aclose_closes_shared_in_reverse_order() -> None:
    """Governor.aclose closes shared objects, last created first."""
    log: list[str] = []
    gov = Governor()
    gov.shared("a", lambda: Closable(log, "a"))
    gov.shared("b", lambda: Closable(log, "b"))
    await gov.aclose()
    assert log == ["b", "a"]


async def test_a_governed_request_leaves_no_reference_cycles() -> None:
    """Every layer's per-request objects are freed by reference counting alone.

    A cycle per request (the request context holding a callable that holds the context)
    leaves every request to the cyclic garbage collector, whose passes then cost a fifth
    of governor's CPU.
    """
    gov = Governor(Config(demo_keys=True))
    app = wrap(ok_app, gov)
    request = {"model": "gpt-5-5", "messages": [{"role": "user", "content": "hi"}]}
    await call(app, headers=auth(), json_body=request)  # objects built on first use
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            assert (await call(app, headers=auth(), json_body=request)).status == 200
        gc.collect()
        # Only governor's own objects: leftovers of earlier tests (a fakeredis socket
        # closing) may turn to garbage in this window too.
        left = [type(o).__name__ for o in gc.garbage if _governors(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await gov.aclose()
    assert left == []


def _governors(obj: object) -> bool:
    """Whether *obj* is governor's: an instance of one of its classes, or one of its
    functions, closures' cells excepted, coroutines or frames."""
    if type(obj).__module__.startswith("governor"):
        return True
    code = getattr(obj, "__code__", None) or getattr(obj, "cr_code", None)
    code = code or getattr(obj, "f_code", None)
    return code is not None and "/governor/" in code.co_filename
