"""Where usage records go: an in-memory ring, a JSON lines file, a bounded Redis stream.

Every sink answers :meth:`UsageSink.recent` (a key's latest records, newest first),
which ``GET /v1/managed/usage`` serves.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
from pathlib import Path
from typing import IO, Protocol

from governor.backends import RedisBackend, map_redis_errors
from governor.errors import BackendError, ConfigurationError
from governor.runtime import Governor
from governor.usage_log.records import UsageRecord


class UsageSink(Protocol):
    """A destination for usage records."""

    async def write(self, record: UsageRecord) -> None: ...

    async def recent(self, key_id: str, limit: int) -> list[UsageRecord]:
        """The latest *limit* records of *key_id*, newest first."""
        ...

    async def aclose(self) -> None: ...


class MemorySink:
    """The last *size* records of this process."""

    def __init__(self, size: int = 10_000) -> None:
        self.records: collections.deque[UsageRecord] = collections.deque(maxlen=size)

    async def write(self, record: UsageRecord) -> None:
        self.records.append(record)

    async def recent(self, key_id: str, limit: int) -> list[UsageRecord]:
        found: list[UsageRecord] = []
        for record in reversed(self.records):
            if record.key_id == key_id:
                found.append(record)
                if len(found) >= limit:
                    break
        return found

    async def aclose(self) -> None:
        pass


class JsonlSink:
    """One JSON object per line, appended by a worker thread (the event loop never
    touches the file); the latest records stay in a ring for :meth:`recent`."""

    def __init__(self, path: str | Path, *, ring_size: int = 10_000) -> None:
        self.path = Path(path)
        self._ring = MemorySink(ring_size)
        self._pending: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self._file: IO[str] | None = None

    async def write(self, record: UsageRecord) -> None:
        await self._ring.write(record)
        self._pending.append(json.dumps(record.as_json(), separators=(",", ":")) + "\n")
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        # Records written while a batch is on disk go in the next batch.
        while self._pending:
            batch, self._pending = self._pending, []
            await asyncio.to_thread(self._append, "".join(batch))

    def _append(self, text: str) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(text)
        self._file.flush()

    async def flush(self) -> None:
        """Wait until every record written so far is in the file."""
        while self._flusher is not None and not self._flusher.done():
            await self._flusher
        if self._pending:
            await self._flush()

    async def recent(self, key_id: str, limit: int) -> list[UsageRecord]:
        return await self._ring.recent(key_id, limit)

    async def aclose(self) -> None:
        await self.flush()
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
            self._file = None


class RedisStreamSink:
    """Records in two capped Redis streams (``XADD ... MAXLEN ~``): every record in
    ``<prefix>:usage``, and each key's in ``<prefix>:usage:key:<key_id>`` for
    :meth:`recent`. Each entry has one field, ``r``: the record as JSON."""

    def __init__(
        self,
        backend: RedisBackend,
        *,
        maxlen: int = 100_000,
        key_maxlen: int = 1_000,
        backlog: int = 10_000,
    ) -> None:
        self._backend = backend
        self._all = backend.key("usage")
        self._maxlen = maxlen
        self._key_maxlen = key_maxlen
        # Records not yet in Redis (it was down): kept, within a bound, in order.
        self._backlog: collections.deque[tuple[str, str]] = collections.deque()
        self._backlog_max = backlog
        self._flushing = False

    def key_stream(self, key_id: str) -> str:
        return self._backend.key("usage", "key", key_id)

    async def write(self, record: UsageRecord) -> None:
        """Append *record*; with Redis down it waits in a bounded local backlog, written
        (oldest first) with the next record that goes through. Raises BackendError only
        when the backlog is full and its oldest record had to be dropped."""
        data = json.dumps(record.as_json(), separators=(",", ":"))
        dropped = len(self._backlog) >= self._backlog_max
        if dropped:
            self._backlog.popleft()
        self._backlog.append((record.key_id, data))
        await self.flush()
        if dropped:
            raise BackendError("usage: Redis backlog full, the oldest record was dropped")

    async def flush(self) -> None:
        """Write the backlog; keep it (and raise nothing) while Redis is down."""
        if self._flushing:
            return  # one writer at a time keeps the streams in order
        self._flushing = True
        try:
            while self._backlog:
                batch = list(itertools.islice(self._backlog, 500))
                try:
                    with map_redis_errors("usage"):
                        pipe = self._backend.redis.pipeline(transaction=False)
                        for key_id, data in batch:
                            pipe.xadd(self._all, {"r": data}, maxlen=self._maxlen, approximate=True)
                            pipe.xadd(
                                self.key_stream(key_id),
                                {"r": data},
                                maxlen=self._key_maxlen,
                                approximate=True,
                            )
                        await pipe.execute()
                except BackendError:
                    return
                for _ in batch:
                    self._backlog.popleft()
        finally:
            self._flushing = False

    @property
    def pending(self) -> int:
        """Records waiting for Redis."""
        return len(self._backlog)

    async def recent(self, key_id: str, limit: int) -> list[UsageRecord]:
        with map_redis_errors("usage"):
            entries = await self._backend.redis.xrevrange(self.key_stream(key_id), count=limit)
        records = []
        for _id, fields in entries or ():
            raw = (fields or {}).get(b"r")
            if raw is not None:
                records.append(UsageRecord.from_json(json.loads(raw)))
        return records

    async def aclose(self) -> None:
        pass


def sink_from_config(governor: Governor) -> UsageSink:
    """A new sink as ``[usage]`` says."""
    cfg = governor.config.usage
    if cfg.sink == "jsonl":
        return JsonlSink(cfg.path, ring_size=cfg.ring_size)
    if cfg.sink == "redis":
        backend = governor.backend
        if not isinstance(backend, RedisBackend):
            raise ConfigurationError("usage.sink: 'redis' needs backend = 'redis'")
        return RedisStreamSink(backend, maxlen=cfg.stream_maxlen, key_maxlen=cfg.key_stream_maxlen)
    return MemorySink(cfg.ring_size)


def sink_for(governor: Governor) -> UsageSink:
    """The one usage sink of *governor* (the middleware writes it, the route reads it)."""
    return governor.shared("usage.sink", lambda: sink_from_config(governor))


def set_sink(governor: Governor, sink: UsageSink) -> None:
    """Use *sink* for *governor*'s usage records (a custom destination)."""
    governor.set_shared("usage.sink", sink)
