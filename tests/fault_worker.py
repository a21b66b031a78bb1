"""A worker process that dies mid-stream (tests/test_faults_worker.py).

``python -m tests.fault_worker <redis url> <prefix> <lease s>`` runs the full stack on
the Redis backend, starts a slow stream (it holds a slot, a billing reservation and
rate budget), prints ``HOLDING <request id>`` once the first chunk arrived, and waits to be
SIGKILLed.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from governor.config import AdmissionConfig
from tests.fault_support import CHAT, chat, full_stack, make_config


async def main(url: str, prefix: str, lease_s: float) -> None:
    config = make_config(
        redis_url=url,
        prefix=prefix,
        reservation_ttl_s=lease_s,
        admission=AdmissionConfig(lease_ttl_s=lease_s, heartbeat_s=lease_s / 3),
    )
    async with full_stack(config) as stack:
        started = asyncio.Event()

        def seen(messages: list[Any]) -> bool:
            if any(m.get("body") for m in messages if m["type"] == "http.response.body"):
                started.set()
            return False

        slow = {"x-mock-chunk-delay-ms": "5000", "x-mock-chunks": "8"}
        task = asyncio.create_task(
            stack.call(CHAT, chat(stream=True), headers=slow, disconnect=seen)
        )
        await started.wait()
        print("HOLDING", flush=True)
        await task  # never ends before the SIGKILL


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
