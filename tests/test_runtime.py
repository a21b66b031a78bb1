"""The Governor runtime: shared per-governor objects and closing them."""

from __future__ import annotations

from governor import Governor


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
