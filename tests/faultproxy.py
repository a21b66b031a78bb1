"""A small TCP fault proxy (toxiproxy-style) for putting faults between governor and Redis.

It forwards bytes both ways and can add latency per chunk, cut every open connection,
refuse new ones ("down"), and come back. Tests point a backend at ``proxy.url`` instead
of the real server; the server itself, shared with other tests, is never slowed or
stopped.
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    """Forward 127.0.0.1:<port> to *target*, with faults switched on and off at will."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 6379) -> None:
        self.target = (target_host, target_port)
        self.delay = 0.0
        self.down = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            dst.close()

    def cut(self) -> None:
        """Close every open connection (like a Redis crash seen from the client)."""
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def kill(self) -> None:
        """Cut every connection and refuse new ones until :meth:`restore`."""
        self.down = True
        self.cut()

    def restore(self) -> None:
        self.down = False
        self.delay = 0.0

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
