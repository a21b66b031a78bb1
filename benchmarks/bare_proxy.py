"""The bare forwarding proxy: the demo gateway's routing and forwarding client, no governor.

    python benchmarks/bare_proxy.py --upstream http://127.0.0.1:9000 --port 8001 [--workers N]

The benchmarks' baseline: the same Starlette routes, the same aiohttp forwarding client
and the same uvicorn settings (httptools, uvloop when installed) as
``examples/demo_proxy.py``, so the difference between the two is governor's cost.
Upstream credentials come from ``GOVERNOR_OPENAI_API_KEY`` / ``GOVERNOR_ANTHROPIC_API_KEY``
as in the demo.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.applications import Starlette

from examples.forwarder import UpstreamSettings, bare_app
from examples.serving import FAST_SERVING

UPSTREAM_ENV = "BENCH_BARE_UPSTREAM"


def create_app() -> Starlette:
    """The bare proxy of the environment's settings (each uvicorn worker calls this)."""
    return bare_app(
        UpstreamSettings.for_root(
            os.environ[UPSTREAM_ENV],
            openai_key=os.environ.get("GOVERNOR_OPENAI_API_KEY"),
            anthropic_key=os.environ.get("GOVERNOR_ANTHROPIC_API_KEY"),
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the upstream's server root")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ[UPSTREAM_ENV] = args.upstream
    uvicorn.run(
        "benchmarks.bare_proxy:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        **FAST_SERVING,
    )


if __name__ == "__main__":
    main()
