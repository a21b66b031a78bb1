"""Latency insurance: what a settled request is owed for being slow.

Statuses (``X-Hypereal-Insurance-Status`` and ``hypereal.insurance.status``):

- ``pending``: a stream has started; it settles when the stream ends (headers only).
- ``paid``: a successful, charged request ran past the threshold; credits went back.
- ``not_triggered``: successful and charged, within the threshold.
- ``not_eligible``: not a successful request with a credit charge (reason says why).

Compensation is ``ceil(credits_charged * compensation_ratio)`` (exact arithmetic), so
it is never below the ratio and never above the charge: 12 credits at 25 % pay 3,
10 pay 3, 1 pays 1. Latency is "past" the threshold only when strictly greater.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

from governor import headers as h
from governor.types import RawHeaders

PAID = "paid"
PENDING = "pending"
NOT_TRIGGERED = "not_triggered"
NOT_ELIGIBLE = "not_eligible"

# Header names in their wire form, made once (every billed response carries them).
_STATUS = h.wire(h.INSURANCE_STATUS)
_TRIGGER = h.wire(h.INSURANCE_TRIGGER)
_LATENCY_MS = h.wire(h.INSURANCE_LATENCY_MS)
_THRESHOLD_MS = h.wire(h.INSURANCE_THRESHOLD_MS)
_CREDITS = h.wire(h.INSURANCE_CREDITS)
_PENDING = h.header(h.INSURANCE_STATUS, PENDING)
_LATENCY_TRIGGER = h.header(h.INSURANCE_TRIGGER, "latency")


@dataclasses.dataclass(frozen=True, slots=True)
class Insurance:
    """One request's insurance settlement."""

    status: str
    trigger: str
    reason: str
    latency_ms: int
    threshold_ms: int
    credits_charged: int
    credits_compensated: int

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "trigger": self.trigger,
            "reason": self.reason,
            "latency_ms": self.latency_ms,
            "threshold_ms": self.threshold_ms,
            "credits_charged": self.credits_charged,
            "credits_compensated": self.credits_compensated,
        }

    def headers(self) -> RawHeaders:
        return [
            (_STATUS, self.status.encode("latin-1")),
            (_TRIGGER, self.trigger.encode("latin-1")),
            (_LATENCY_MS, b"%d" % self.latency_ms),
            (_THRESHOLD_MS, b"%d" % self.threshold_ms),
            (_CREDITS, b"%d" % self.credits_compensated),
        ]


def pending_headers(threshold_ms: int) -> RawHeaders:
    """The policy headers a stream carries before it settles."""
    return [_PENDING, _LATENCY_TRIGGER, (_THRESHOLD_MS, b"%d" % threshold_ms)]


def compensation(charged: int, ratio: float) -> int:
    """Credits owed back for a slow request charged *charged* credits."""
    return min(charged, math.ceil(charged * Fraction(str(ratio))))


def evaluate(
    *,
    success: bool,
    charged: int,
    latency_ms: int,
    threshold_ms: int,
    ratio: float,
) -> Insurance:
    """The settlement of one finished request."""
    if not success:
        return Insurance(NOT_ELIGIBLE, "none", "request_failed", latency_ms, threshold_ms, 0, 0)
    if charged <= 0:
        return Insurance(
            NOT_ELIGIBLE, "none", "no_credit_charge", latency_ms, threshold_ms, charged, 0
        )
    if latency_ms <= threshold_ms:
        return Insurance(
            NOT_TRIGGERED, "none", "within_threshold", latency_ms, threshold_ms, charged, 0
        )
    return Insurance(
        PAID,
        "latency",
        "latency_threshold_exceeded",
        latency_ms,
        threshold_ms,
        charged,
        compensation(charged, ratio),
    )
