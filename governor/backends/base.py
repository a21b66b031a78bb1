"""The backend handle every stateful capability receives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis


_B = TypeVar("_B", bound="Backend")


class Backend:
    """A state backend. ``kind`` says which implementation a capability should build."""

    kind: Literal["memory", "redis"]
    prefix: str = "gov"

    @property
    def redis(self) -> Redis:
        raise TypeError(f"the {self.kind} backend has no Redis client")

    def key(self, *parts: str) -> str:
        """A Redis key under this backend's prefix: ``gov:part:part``."""
        return ":".join((self.prefix, *parts))

    async def aclose(self) -> None:
        """Release connections; the backend is unusable afterwards."""

    async def __aenter__(self: _B) -> _B:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class MemoryBackend(Backend):
    """State in this process only: nothing to install, correct for one worker."""

    kind: Literal["memory", "redis"] = "memory"

    def __repr__(self) -> str:
        return "MemoryBackend()"
