"""One worker process of the multi-process billing test.

``python -m tests.billing_worker <redis url> <prefix> <limit> <requests>`` sends
*requests* concurrent chat requests through billing on a RedisBackend under *prefix*
(the upstream reports no usage, so each admitted request is charged exactly its
16-credit reservation) and prints the response statuses as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys

from governor.backends import RedisBackend
from governor.clock import ManualClock
from governor.config import RedisConfig
from tests.billing_apps import KEY, chat_body, chat_completion, json_app, make_governor, stack
from tests.helpers import call


async def main(url: str, prefix: str, limit: str, requests: int) -> list[int]:
    clock = ManualClock()
    async with RedisBackend(RedisConfig(url=url, key_prefix=prefix, max_connections=200)) as b:
        kwargs = {"balance": 200} if limit == "balance" else {"balance": 10**9, limit: 200}
        gov = make_governor(b, clock, **kwargs)  # type: ignore[arg-type]
        app = stack(json_app(clock, chat_completion(usage=None)), gov)
        results = await asyncio.gather(
            *(
                call(app, headers={"authorization": f"Bearer {KEY}"}, json_body=chat_body())
                for _ in range(requests)
            )
        )
        return [r.status for r in results]


if __name__ == "__main__":
    statuses = asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    print(json.dumps(statuses))
