"""Prices to credits.

Catalog prices are US dollars per million tokens per token class (input, cache read,
cache write, output). A class the spec lists as "n/a" (``None``) is billed at the
model's input price: those tokens are still read by the model, and input is the
conservative rate the spec does give.

Credits are whole: the exact cost of a request (rational arithmetic, no float drift)
divided by ``billing.credit_usd`` and **rounded up** per request, so a request that
used any token costs at least one credit and governor never bills less than the
price list. Images are billed from the upstream's reported usage like text; the
estimate reserves ``billing.image_output_tokens`` output tokens per image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction

from governor.catalog import ModelSpec
from governor.context import RequestContext
from governor.usage import Usage

_MILLION = 1_000_000


def _exact(value: float) -> Fraction:
    """A price as written (``0.315``), not as the nearest binary float."""
    return Fraction(str(value))


@dataclasses.dataclass(frozen=True, slots=True)
class Rates:
    """Credits per token for each class of one model, exactly: integer numerators over
    one common denominator (integer arithmetic on the hot path, no float drift)."""

    input: int
    cache_read: int
    cache_write: int
    output: int
    denominator: int

    def cost(self, usage: Usage) -> Fraction:
        """Exact credits (fractional) of *usage*."""
        return Fraction(self._numerator(usage), self.denominator)

    def _numerator(self, usage: Usage) -> int:
        return (
            usage.input_tokens * self.input
            + usage.cache_read_tokens * self.cache_read
            + usage.cache_write_tokens * self.cache_write
            + usage.output_tokens * self.output
        )

    def credits(self, usage: Usage) -> int:
        """Whole credits of *usage*: the exact cost rounded up."""
        return -(-self._numerator(usage) // self.denominator)


@functools.lru_cache(maxsize=1024)
def rates(model: ModelSpec, credit_usd: float) -> Rates:
    """Credits per token of *model* when one credit is worth *credit_usd* dollars."""
    per = _exact(credit_usd) * _MILLION
    base = _exact(model.input_price)

    def rate(price: float | None) -> Fraction:
        return (base if price is None else _exact(price)) / per

    exact = [
        base / per,
        rate(model.cache_read_price),
        rate(model.cache_write_price),
        _exact(model.output_price) / per,
    ]
    denominator = math.lcm(*(r.denominator for r in exact))
    i, r, w, o = (int(x * denominator) for x in exact)
    return Rates(i, r, w, o, denominator)


def credits_for(model: ModelSpec, usage: Usage, credit_usd: float) -> int:
    """Whole credits *usage* of *model* costs (rounded up)."""
    return rates(model, credit_usd).credits(usage)


def estimate_usage(
    ctx: RequestContext, *, default_output_reserve: int, image_output_tokens: int
) -> Usage:
    """The worst-case usage of *ctx*, before it runs.

    Input: the request's estimated input tokens, all at the (highest) uncached input
    price. Output: the caller's cap, else *default_output_reserve*, within the model's
    maximum; image generations reserve *image_output_tokens* per image instead (and
    chat requests asking for images reserve both).
    """
    output = 0
    if ctx.image_count:
        output += ctx.image_count * image_output_tokens
    if not ctx.image_count or ctx.output_cap is not None or ctx.payload.get("messages"):
        output += ctx.output_reserve(default_output_reserve)
    return Usage(input_tokens=ctx.input_tokens, output_tokens=output)
