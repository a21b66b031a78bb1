"""Window arithmetic, header formats and request plans: pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from governor.catalog import DEFAULT_MODELS
from governor.config import Config, KeyEntry, ModelLimits
from governor.context import RequestContext, Surface, apply_payload
from governor.keys import policy_from_entry
from governor.ratelimit import Guard, Window, counted_tokens
from governor.ratelimit.guards import Items, go_duration, plan, rfc3339
from governor.usage import Usage

E = 60


def test_empty_window_waits_for_nothing() -> None:
    """Room now: no wait, full remaining."""
    w = Window(0, 0, 0, 0)
    assert w.wait(E, 1) == 0
    assert w.remaining(10, E) == 10


def test_full_current_window_waits_for_its_end() -> None:
    """A limit filled in the current window frees one unit as that window ends."""
    w = Window(0, 0, 10, E + 20)  # the current window ends in 20 s
    assert w.remaining(10, E) == 0
    assert w.retry_after(10, E, 1) == pytest.approx(20.001)
    # All ten free up once the weight of the old window decays below one.
    assert w.reset(E) == pytest.approx(20 + E * 0.9)


def test_previous_window_decays_linearly() -> None:
    """Weight of the previous window: count * ttl / window; room comes as it decays."""
    w = Window(10, 30, 3, E + 30)  # weighted 10 * 30/60 + 3 = 8
    assert w.count(E) == 8
    # Cost 5 needs w < 6: 10 * t / 60 < 3 -> previous ttl below 18 s, 12 s from now.
    assert w.retry_after(10, E, 5) == pytest.approx(12.001)


def test_cost_above_current_after_rollover() -> None:
    """When the current window alone is too full, wait for its end and some decay."""
    w = Window(0, 0, 8, E + 10)
    # Cost 5 on a limit of 10 needs w < 6: after the window ends, 8 * (60-s)/60 < 6.
    assert w.retry_after(10, E, 5) == pytest.approx(10 + 15 + 0.001)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.5, "500ms"),
        (1, "1s"),
        (59.2, "1m0s"),
        (360, "6m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    """Reset durations read like OpenAI's: 12ms, 1s, 6m0s; never early."""
    assert go_duration(seconds) == text


def test_rfc3339() -> None:
    """Anthropic resets are RFC 3339 UTC timestamps, rounded up to the second."""
    assert rfc3339(1_700_000_000.2) == "2023-11-14T22:13:21Z"


def test_counted_tokens_leave_out_cache_reads() -> None:
    """TPM counts uncached input, cache writes and output; not cache reads."""
    assert counted_tokens(Usage(100, 50, cache_read_tokens=900, cache_write_tokens=20)) == 170


def ctx_for(payload: dict[str, Any], surface: Surface, entry: KeyEntry) -> RequestContext:
    ctx = RequestContext(
        request_id="r",
        arrived=0,
        arrived_wall=0,
        surface=surface,
        native=False,
        path="/",
        method="POST",
        key_id="key_1",
        account=entry.account,
        policy=policy_from_entry("k", entry),
        headers=[],
        client=None,
    )
    apply_payload(ctx, payload, Config().catalog())
    return ctx


def test_plan_lists_every_configured_guard() -> None:
    """Model, account, key and key-on-model guards for each unit that applies."""
    entry = KeyEntry(
        account="a",
        key="k",
        rpm=10,
        tpm=1000,
        ipm=5,
        model_limits={"gpt-image-2": ModelLimits(rpm=3, tpm=500, ipm=2)},
    )
    ctx = ctx_for({"model": "gpt-image-2", "prompt": "x", "n": 2}, Surface.IMAGES, entry)
    p = plan(ctx, Config(), Items(E))
    assert [h.limit.guard for h in p.hits] == list(Guard)
    costs = {h.limit.guard: h.cost for h in p.hits}
    assert costs[Guard.MODEL_IPM] == 2
    # The reservation is clamped to the smallest token limit (500).
    assert p.reserved_tokens == 500
    assert costs[Guard.MODEL_TPM] == 500


def test_plan_without_key_limits() -> None:
    """A key without limits meets the model and account guards only; no images on text."""
    ctx = ctx_for(
        {"model": "gpt-5-5", "messages": [], "max_tokens": 10}, Surface.CHAT, KeyEntry(account="a")
    )
    p = plan(ctx, Config(), Items(E))
    assert [h.limit.guard for h in p.hits] == [Guard.MODEL_RPM, Guard.ACCOUNT_RPM, Guard.MODEL_TPM]
    assert p.too_large is None


def test_catalog_models_all_have_rpm_and_tpm() -> None:
    """Every catalog model has the limits the guards read."""
    for spec in DEFAULT_MODELS:
        assert spec.rpm > 0
        assert spec.tpm > 0
