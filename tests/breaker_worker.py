"""A second worker process for the fleet test: serves through a breaker on a shared Redis.

``python -m tests.breaker_worker <redis url> <key prefix>``: prints ``ready`` once its
breaker has synced, then sends a request every 10 ms and prints ``refused <wall time>``
at the first one refused (or ``timeout`` after 15 s).
"""

from __future__ import annotations

import asyncio
import sys
import time

from prometheus_client import CollectorRegistry

from governor.breaker import BreakerMiddleware
from governor.config import Config, RedisConfig
from governor.runtime import Governor
from tests.apps import ok_app
from tests.breaker_support import breaker_config
from tests.helpers import auth, call


async def main(url: str, prefix: str) -> None:
    config = Config(
        backend="redis",
        demo_keys=True,
        redis=RedisConfig(url=url, key_prefix=prefix),
        breaker=breaker_config(reset_timeout_s=30.0, max_reset_timeout_s=60.0),
    )
    async with Governor(config, registry=CollectorRegistry()) as governor:
        app = BreakerMiddleware(ok_app, governor=governor)
        first = await call(app, headers=auth(), json_body={"model": "gpt-5-5"})
        assert first.status == 200, first.status
        print("ready", flush=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            result = await call(app, headers=auth(), json_body={"model": "gpt-5-5"})
            if result.status == 503:
                print(f"refused {time.time()}", flush=True)
                break
            await asyncio.sleep(0.01)
        else:
            print("timeout", flush=True)
        await app.breakers.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
