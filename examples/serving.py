"""Serving an ASGI app with uvicorn inside this process: as a task, or on a thread.

Tests and the demo start the mock upstream and the proxy in-process, on a socket bound
to port 0 (the OS picks a free port), so nothing ever races for a fixed port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn

from governor.types import ASGIApp


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server for embedding: no signal handlers, and a quick stop.

    uvicorn polls for its exit flag and for open connections every 0.1 s, which makes
    each stop cost 0.2-0.4 s; tests start and stop dozens of servers, so this one polls
    every few milliseconds instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            await asyncio.sleep(0.01)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.timeout_graceful_shutdown or 5)
        # uvicorn's server state has no event to wait on: poll it, briefly.
        while (state.connections or state.tasks) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        for task in state.tasks:
            task.cancel()
        if not self.force_exit:
            await self.lifespan.shutdown()


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on *host*:*port* (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


# How the demo and the benchmarks' bare proxy serve: httptools and uvloop (when
# installed), no access log; the same settings for both keep comparisons fair.
FAST_SERVING: dict[str, Any] = {"http": "httptools", "loop": "auto", "access_log": False}


# Collections of the youngest generation at 20,000 new container objects instead of 700:
# a governed request allocates hundreds, and each collection walks every request in
# flight; measured over loopback, 20,000 cut the governed proxy's CPU per request by
# about 9% (100,000 gained less).
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Set the garbage collector up for a long-lived server, once serving starts.

    Everything alive by then (modules, config, catalog, routes, clients) lives as long
    as the process: ``gc.freeze`` keeps full collections from walking it again, as
    large Python servers do; and the young generation is collected less often
    (:data:`GC_THRESHOLDS`). The demo and the bare proxy both call it, so comparisons
    stay fair. ``GOVERNOR_GC_TUNE=0`` leaves Python's defaults."""
    if os.environ.get("GOVERNOR_GC_TUNE", "1") != "0":
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)


def server_config(app: ASGIApp, **options: Any) -> uvicorn.Config:
    """uvicorn settings for an embedded server: httptools, quiet, lifespan on, quick stop."""
    settings: dict[str, Any] = {
        "http": "httptools",
        "log_level": "warning",
        "lifespan": "on",
        "access_log": False,
        "timeout_graceful_shutdown": 1,
    }
    settings.update(options)
    return uvicorn.Config(app, **settings)


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve *app* on the running loop; yields its base URL (``http://127.0.0.1:PORT``)."""
    sock = bind(host, port)
    server = EmbeddedServer(server_config(app))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped while starting")
            await asyncio.sleep(0.005)
        yield url_of(sock)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


class ServerThread:
    """Serve an ASGI app on a thread of its own (its own event loop) until :meth:`stop`."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = EmbeddedServer(server_config(app, loop="auto"))
        self._thread = threading.Thread(target=self._run, name="mock-upstream", daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            pause.wait(0.005)  # a plain thread, not the event loop: waiting is fine here
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)
        self.sock.close()


class DropFilter(logging.Filter):
    """Hides uvicorn's traceback for exceptions raised on purpose to cut a connection."""

    def __init__(self, *kinds: type[BaseException]) -> None:
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, self.kinds)
