"""The fingerprint state contract: suspensions, strikes and per-key behaviour.

Two implementations: :mod:`.memory` (one process) and :mod:`.redis` (a fleet; a
suspension has no TTL there, so it survives restarts). :func:`store_for` gives every
middleware and admin handle of one backend the same store.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from governor.backends import Backend, RedisBackend

if TYPE_CHECKING:
    from governor.clock import Clock
    from governor.runtime import Governor


@dataclasses.dataclass(frozen=True)
class Suspension:
    """Why and when a key was suspended. Never holds the raw key."""

    key_id: str
    account: str = ""
    reasons: tuple[str, ...] = ()
    at: float = 0.0
    strikes: int = 0
    model: str = ""
    request_id: str = ""
    by: str = "fingerprint"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Suspension:
        data: dict[str, Any] = json.loads(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in names}
        kept["reasons"] = tuple(kept.get("reasons", ()))
        return cls(**kept)

    def public(self) -> dict[str, Any]:
        """The record as JSON-ready data (admin API)."""
        data = dataclasses.asdict(self)
        data["reasons"] = list(self.reasons)
        return data


@dataclasses.dataclass(frozen=True)
class Windows:
    """Behavioural windows (seconds) and the member caps that keep state bounded."""

    devices_s: float
    sessions_s: float
    addresses_s: float
    cap: int


@dataclasses.dataclass(frozen=True)
class Seen:
    """Distinct devices, sessions and client addresses of a key within their windows."""

    devices: int = 0
    sessions: int = 0
    addresses: int = 0


class FingerprintStore(Protocol):
    """Where suspensions, strikes and behaviour live."""

    async def epoch(self) -> str:
        """A token that changes when the store lost its data (Redis flushed or restarted)."""
        ...

    async def suspension(self, key_id: str) -> Suspension | None:
        """The key's suspension, if it is suspended."""
        ...

    async def strike(self, record: Suspension, *, threshold: int, ttl_s: float) -> tuple[int, bool]:
        """Count a strike; suspend (with *record*) at *threshold*. -> (strikes, suspended)."""
        ...

    async def observe(
        self, key_id: str, device: str, session: str, address: str, windows: Windows
    ) -> Seen:
        """Record one request's device, session and address ('' = none); count each."""
        ...

    async def first_sender(self, body_hash: str, sender: str, ttl_s: float) -> str | None:
        """Who first sent this body within *ttl_s* (None: nobody, remembered as *sender*)."""
        ...

    async def suspensions(self) -> list[Suspension]:
        """Every suspended key."""
        ...

    async def suspend(self, record: Suspension) -> None:
        """Suspend a key now (operator action); replaces any record."""
        ...

    async def lift(self, key_id: str) -> bool:
        """Lift a suspension and clear its strikes; False if the key was not suspended."""
        ...


_STORES: weakref.WeakKeyDictionary[Backend, FingerprintStore] = weakref.WeakKeyDictionary()


def store_for(backend: Backend, clock: Clock) -> FingerprintStore:
    """The one fingerprint store of *backend* (shared by middlewares and admin routes)."""
    store = _STORES.get(backend)
    if store is None:
        if isinstance(backend, RedisBackend):
            from governor.fingerprint.redis import RedisFingerprintStore

            store = RedisFingerprintStore(backend)
        else:
            from governor.fingerprint.memory import MemoryFingerprintStore

            store = MemoryFingerprintStore(clock)
        _STORES[backend] = store
    return store


class ClearedKeys:
    """Keys this worker saw *not* suspended in the shared store, and until when it may
    trust that without asking again.

    Asking Redis on every request costs a round trip before every upstream call; a key
    suspended by another worker is refused here at most ``ttl_s`` later. A suspension
    made or lifted through this governor (a strike, the operator API) forgets the key at
    once. ``ttl_s`` 0 asks every time.
    """

    MAX_KEYS = 100_000

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._until: dict[str, float] = {}

    def trusted(self, key_id: str, now: float) -> bool:
        until = self._until.get(key_id)
        return until is not None and now < until

    def clear(self, key_id: str, now: float) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._until) >= self.MAX_KEYS:
            self._until.clear()  # a crude bound: the cost is one more lookup per key
        self._until[key_id] = now + self.ttl_s

    def forget(self, key_id: str) -> None:
        self._until.pop(key_id, None)


def cleared_keys(governor: Governor) -> ClearedKeys:
    """The one :class:`ClearedKeys` of *governor* (shared by the middleware and the
    operator API, so an operator's suspension applies here at once)."""
    # In memory the lookup is a dict get: nothing to save, so no staleness either.
    ttl = governor.config.fingerprint.suspension_cache_s if governor.backend.kind == "redis" else 0
    return governor.shared("fingerprint.cleared", lambda: ClearedKeys(ttl))
