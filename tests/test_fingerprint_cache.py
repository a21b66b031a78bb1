"""The "not suspended" cache: one backend lookup per key per second, bounded staleness."""

from __future__ import annotations

from governor import Governor
from governor.backends import Backend
from governor.clock import ManualClock
from governor.config import Config, FingerprintConfig, KeyEntry
from governor.fingerprint import FingerprintMiddleware, Suspensions
from governor.fingerprint.store import Suspension, store_for
from governor.keys import key_id
from tests.apps import EchoApp
from tests.helpers import auth, call

BODY = {"model": "gpt-5-5", "messages": []}


def make(backend: Backend, clock: ManualClock) -> tuple[Governor, FingerprintMiddleware]:
    config = Config(
        keys={"a": KeyEntry(account="acme", key="ck_a")},
        fingerprint=FingerprintConfig(suspension_cache_s=1.0),
    )
    gov = Governor(config, backend=backend, clock=clock)
    return gov, FingerprintMiddleware(EchoApp(), governor=gov)


async def test_another_workers_suspension_applies_within_the_cache_time(
    backend: Backend, clock: ManualClock
) -> None:
    """A suspension written by another worker is refused here once the cache time passes."""
    _, app = make(backend, clock)
    assert (await call(app, headers=auth("ck_a"), json_body=BODY)).status == 200
    other = store_for(backend, clock)  # another worker's view of the same backend
    record = Suspension(key_id=key_id("ck_a"), account="acme", reasons=("test",), at=0.0)
    await other.suspend(record)
    # Redis: within the cache time this worker still serves the key; memory: no cache.
    during = (await call(app, headers=auth("ck_a"), json_body=BODY)).status
    assert during == (200 if backend.kind == "redis" else 403)
    clock.advance(1.01)
    assert (await call(app, headers=auth("ck_a"), json_body=BODY)).status == 403


async def test_operator_suspension_applies_at_once(backend: Backend, clock: ManualClock) -> None:
    """A suspension made through this governor's operator API is refused immediately."""
    gov, app = make(backend, clock)
    assert (await call(app, headers=auth("ck_a"), json_body=BODY)).status == 200
    await Suspensions(gov).suspend(key_id("ck_a"))
    assert (await call(app, headers=auth("ck_a"), json_body=BODY)).status == 403
    await Suspensions(gov).lift(key_id("ck_a"))
    assert (await call(app, headers=auth("ck_a"), json_body=BODY)).status == 200
