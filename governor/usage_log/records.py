"""One usage record per governed model request, and the client family of a request."""

from __future__ import annotations

import dataclasses
from typing import Any

from governor import headers as h
from governor.billing import insurance as ins
from governor.context import RequestContext
from governor.response import Outcome
from governor.types import RawHeaders


@dataclasses.dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one request did and cost. Never the raw key: ``key_id`` only."""

    request_id: str
    time: float
    key_id: str
    account: str
    model: str
    surface: str
    stream: bool
    status: int
    outcome: str
    refusal: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    credits_reserved: int
    credits_charged: int
    credits_compensated: int
    insurance_status: str | None
    latency_ms: int
    queue_wait_ms: int | None
    ttfb_ms: int | None
    client_family: str

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def client_family(headers: RawHeaders | dict[bytes, bytes]) -> str:
    """``claude-cli``, ``openai-sdk``, ``anthropic-sdk``, ``curl`` or ``other``, from the
    user agent (a label for usage logs, not a fingerprint: anyone can send any)."""
    found = (
        headers.get(b"user-agent") if isinstance(headers, dict) else h.get(headers, b"user-agent")
    )
    ua = (found or b"").decode("latin-1").lower()
    if ua.startswith(("claude-cli/", "claude-code/")):
        return "claude-cli"
    if ua.startswith(("openai/", "asyncopenai/")):
        return "openai-sdk"
    if ua.startswith(("anthropic/", "asyncanthropic/")):
        return "anthropic-sdk"
    if ua.startswith("curl/"):
        return "curl"
    return "other"


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, round(seconds * 1000))


def build_record(ctx: RequestContext, outcome: Outcome, now: float) -> UsageRecord:
    """The record of a finished request, from its context, response and notes."""
    resp = ctx.response
    usage = resp.usage
    notes = ctx.notes
    ended = resp.finished_at if resp.finished_at is not None else now
    insurance: ins.Insurance | None = notes.get("insurance")
    queue_wait = notes.get("queue_wait_ms")
    return UsageRecord(
        request_id=ctx.request_id,
        time=ctx.arrived_wall,
        key_id=ctx.key_id,
        account=ctx.account,
        model=ctx.model.id if ctx.model is not None else ctx.model_id,
        surface=ctx.surface.value,
        stream=ctx.stream,
        status=resp.status or 0,
        outcome=outcome.value,
        refusal=ctx.refusal,
        input_tokens=usage.input_tokens if usage else 0,
        output_tokens=usage.output_tokens if usage else 0,
        cache_read_tokens=usage.cache_read_tokens if usage else 0,
        cache_write_tokens=usage.cache_write_tokens if usage else 0,
        credits_reserved=int(notes.get("credits_reserved", 0)),
        credits_charged=int(notes.get("credits_charged", 0)),
        credits_compensated=int(notes.get("credits_compensated", 0)),
        insurance_status=insurance.status if insurance is not None else None,
        latency_ms=_ms(ended - ctx.arrived) or 0,
        queue_wait_ms=None if queue_wait is None else round(float(queue_wait)),
        ttfb_ms=_ms(resp.first_byte_at - ctx.arrived) if resp.first_byte_at is not None else None,
        client_family=client_family(ctx.header_map),
    )
