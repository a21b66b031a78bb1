"""Prices to credits: exact per token class, rounded up per request, estimates."""

from __future__ import annotations

import math

import pytest

from governor.billing import credits_for, estimate_usage, splice_hypereal
from governor.billing.insurance import compensation, evaluate
from governor.catalog import Catalog
from governor.context import RequestContext, Surface
from governor.usage import Usage

CATALOG = Catalog()


@pytest.mark.parametrize(
    ("model", "usage", "credits"),
    [
        # 1M tokens of each class of Claude Sonnet 4.7: $3.15 / $0.315 / $3.94 / $15.75.
        ("claude-sonnet-4-7", Usage(input_tokens=1_000_000), 3_150),
        ("claude-sonnet-4-7", Usage(cache_read_tokens=1_000_000), 315),
        ("claude-sonnet-4-7", Usage(cache_write_tokens=1_000_000), 3_940),
        ("claude-sonnet-4-7", Usage(output_tokens=1_000_000), 15_750),
        # Exact decimals: $0.315 is 315 credits, not 316 from float drift.
        ("claude-sonnet-4-7", Usage(input_tokens=100_000), 315),
        # "n/a" cache write is billed at the input price ($5.25).
        ("gpt-5-5", Usage(cache_write_tokens=1_000_000), 5_250),
        ("nano-banana-2", Usage(cache_read_tokens=1_000_000), 525),
        ("deepseek-v4-pro", Usage(cache_read_tokens=1_000_000), 4),  # $0.0038 -> 3.8 -> 4
        ("gpt-image-2", Usage(input_tokens=1_000, output_tokens=4_160), 140),  # 8.4+131.04
        # The spec's example: 12 credits (11.025 rounded up).
        ("claude-sonnet-4-7", Usage(input_tokens=1_000, output_tokens=500), 12),
        # Any token at all costs at least one credit.
        ("claude-haiku-latest", Usage(input_tokens=1), 1),
        ("claude-haiku-latest", Usage(), 0),
    ],
)
def test_credits_per_class(model: str, usage: Usage, credits: int) -> None:
    """Each price class is billed at its catalog price, rounded up to whole credits."""
    assert credits_for(CATALOG[model], usage, 0.001) == credits


@pytest.mark.parametrize("model", sorted(CATALOG))
def test_every_catalog_price_class(model: str) -> None:
    """1M tokens of each class cost the catalog price in credits (rounded up); "n/a"
    classes cost the input price."""
    spec = CATALOG[model]

    def credits(price: float | None) -> int:
        from decimal import Decimal

        return math.ceil(Decimal(str(spec.input_price if price is None else price)) * 1000)

    million = 1_000_000
    assert credits_for(spec, Usage(input_tokens=million), 0.001) == credits(spec.input_price)
    assert credits_for(spec, Usage(cache_read_tokens=million), 0.001) == credits(
        spec.cache_read_price
    )
    assert credits_for(spec, Usage(cache_write_tokens=million), 0.001) == credits(
        spec.cache_write_price
    )
    assert credits_for(spec, Usage(output_tokens=million), 0.001) == credits(spec.output_price)


def test_credit_value_is_configurable() -> None:
    """A credit worth one cent makes everything ten times cheaper in credits."""
    assert credits_for(CATALOG["claude-sonnet-4-7"], Usage(input_tokens=1_000_000), 0.01) == 315


def _ctx(surface: Surface, model: str, payload: dict[str, object], **kw: object) -> RequestContext:
    from governor.config import KeyPolicy

    ctx = RequestContext(
        request_id="r",
        arrived=0.0,
        arrived_wall=0.0,
        surface=surface,
        native=False,
        path="/",
        method="POST",
        key_id="k",
        account="a",
        policy=KeyPolicy(account="a"),
        headers=[],
        client=None,
        model=CATALOG[model],
        payload=payload,
    )
    for name, value in kw.items():
        setattr(ctx, name, value)
    return ctx


def test_estimate_text_uses_cap_or_default() -> None:
    """Text reserves the caller's cap, else the default, plus the input estimate."""
    ctx = _ctx(Surface.CHAT, "claude-sonnet-4-7", {"messages": []}, input_tokens=10)
    assert estimate_usage(ctx, default_output_reserve=4096, image_output_tokens=4160) == Usage(
        10, 4096
    )
    ctx.output_cap = 100
    assert estimate_usage(ctx, default_output_reserve=4096, image_output_tokens=4160) == Usage(
        10, 100
    )


def test_estimate_images_per_image() -> None:
    """Image generations reserve a fixed number of output tokens per image."""
    ctx = _ctx(Surface.IMAGES, "gpt-image-2", {"prompt": "x"}, input_tokens=5, image_count=3)
    assert estimate_usage(ctx, default_output_reserve=4096, image_output_tokens=4160) == Usage(
        5, 3 * 4160
    )


@pytest.mark.parametrize(
    ("charged", "ratio", "paid"), [(12, 0.25, 3), (10, 0.25, 3), (1, 0.25, 1), (7, 1.0, 7)]
)
def test_compensation_rounds_up(charged: int, ratio: float, paid: int) -> None:
    """Compensation is the ratio of the charge rounded up, never above the charge."""
    assert compensation(charged, ratio) == paid


def test_threshold_is_strict() -> None:
    """Exactly at the threshold is not past it."""
    at = evaluate(success=True, charged=12, latency_ms=90_000, threshold_ms=90_000, ratio=0.25)
    past = evaluate(success=True, charged=12, latency_ms=90_001, threshold_ms=90_000, ratio=0.25)
    assert (at.status, at.credits_compensated) == ("not_triggered", 0)
    assert (past.status, past.credits_compensated) == ("paid", 3)


def test_splice_keeps_upstream_bytes() -> None:
    """The hypereal object is appended; the upstream's bytes stay byte for byte."""
    body = b'{"id": "x", "n": 1.0, "s": "\\u00e9"}\n'
    out = splice_hypereal(body, {"billing": {"credits_charged": 1}})
    assert (
        out == b'{"id": "x", "n": 1.0, "s": "\\u00e9","hypereal":{"billing":{"credits_charged":1}}}'
    )
    assert splice_hypereal(b"{}", {"a": 1}) == b'{"hypereal":{"a":1}}'
    merged = splice_hypereal(b'{"hypereal": {"other": 1}}', {"a": 1})
    assert merged == b'{"hypereal": {"other": 1, "a": 1}}'
    assert splice_hypereal(b"[1]", {"a": 1}) == b"[1]"
