"""One breaker per model path in this process, on pybreaker's state machine.

pybreaker is synchronous and has no neutral outcome, so it is never wrapped around the
upstream call: the middleware decides the verdict after the response and then tells
the breaker with ``cb.call`` of a function that returns or raises. Its own reset timer
reads the wall clock and lets every caller through in half-open, so both are taken
over here: the open period runs on governor's injectable clock (doubling on each
re-open up to a cap) and half-open admits only ``half_open_probes`` callers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pybreaker

from governor.breaker.base import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    PROBES_BUSY_RETRY_S,
    Admission,
    Refusal,
    Snapshot,
    Verdict,
)
from governor.config import BreakerConfig

# pybreaker's own open -> half-open timer never fires; the clock here drives it.
_NEVER_S = 1e9


class _UpstreamFailure(Exception):
    """What pybreaker is told when a request failed."""


def _fail() -> None:
    raise _UpstreamFailure


def _succeed() -> None:
    return None


class LocalBreaker:
    """The breaker of one model path in this process.

    In Redis mode it mirrors the shared state (so the request path reads it without a
    round trip) and takes over, counting on its own, while Redis is unreachable.
    """

    def __init__(
        self,
        path: str,
        config: BreakerConfig,
        on_change: Callable[[LocalBreaker, str, str], None],
    ) -> None:
        self.path = path
        self.config = config
        self.cb = pybreaker.CircuitBreaker(
            fail_max=config.failure_threshold,
            reset_timeout=_NEVER_S,
            success_threshold=config.half_open_probes,
            throw_new_error_on_trip=False,
            name=path,
        )
        self.open_until = 0.0
        self.open_for = config.reset_timeout_s
        self.forced: str | None = None
        # Probes let through in the current half-open period, and which period it is:
        # an outcome from an earlier period (or an earlier state) must not count.
        self.probes = 0
        self.gen = 0
        self._on_change = on_change
        self.published = CLOSED
        # Redis mode only: last sync (local clock), the shared failure count, shared
        # probes being asked for or in flight from here, and a pause on asking again.
        self.synced_at: float | None = None
        self.shared_fails = 0
        self.pending_probes = 0
        self.probe_backoff_until = 0.0
        # Replies of this worker's own writes taken; a read begun before one is stale.
        self.writes = 0
        # The newest shared version mirrored: replies can arrive out of order.
        self.version = 0

    @property
    def state(self) -> str:
        """The automatic state (pybreaker's)."""
        return str(self.cb.current_state)

    @property
    def effective(self) -> str:
        """What callers see: the operator's forced state, else the automatic one."""
        return self.forced if self.forced is not None else self.state

    def retry_after(self, now: float) -> float:
        return max(0.0, self.open_until - now)

    # --- the request path -------------------------------------------------------------

    def admit(self, now: float, *, degraded: bool = False) -> Admission | Refusal:
        """Let a request through (maybe as a probe), or refuse it at once."""
        if self.forced == OPEN:
            return Refusal(OPEN, self.config.reset_timeout_s, "forced_open", degraded)
        if self.forced == CLOSED:
            return Admission(self.path, CLOSED, gen=self.gen, record=False, degraded=degraded)
        state = self.state
        if state == CLOSED:
            return Admission(self.path, CLOSED, gen=self.gen, degraded=degraded)
        if state == OPEN:
            if now < self.open_until:
                return Refusal(OPEN, self.open_until - now, "open", degraded)
            self.cb.half_open()
            self._entered(HALF_OPEN, OPEN, now)
        if self.probes < self.config.half_open_probes:
            self.probes += 1
            return Admission(self.path, HALF_OPEN, probe=True, gen=self.gen, degraded=degraded)
        return Refusal(HALF_OPEN, PROBES_BUSY_RETRY_S, "probes_busy", degraded)

    def record(self, admission: Admission, verdict: Verdict, now: float) -> None:
        """Tell the breaker how an admitted request ended."""
        current = admission.gen == self.gen
        if admission.probe and current:
            self.probes = max(0, self.probes - 1)
        if not admission.record or self.forced is not None or verdict is Verdict.NEUTRAL:
            return
        state = self.state
        if state == OPEN or (state == HALF_OPEN and not (admission.probe and current)):
            return  # a late outcome from before the breaker opened: it changes nothing
        ok = verdict is Verdict.SUCCESS
        if ok and state == CLOSED and not self.cb.fail_counter:
            return  # nothing to reset: the common case costs no pybreaker call
        self.tell(ok)
        if self.state != state:
            self._entered(self.state, state, now)

    def tell(self, ok: bool) -> None:
        """Feed one outcome to pybreaker (its counters and transitions)."""
        with contextlib.suppress(_UpstreamFailure, pybreaker.CircuitBreakerError):
            self.cb.call(_succeed if ok else _fail)

    def _entered(self, new: str, old: str, now: float) -> None:
        self.gen += 1
        self.probes = 0
        if new == OPEN:
            base = self.config.reset_timeout_s
            # A failed probe re-opens for twice as long as last time, up to the cap.
            self.open_for = (
                base if old == CLOSED else min(max(self.open_for * 2, base), self.max_open)
            )
            self.open_until = now + self.open_for
        elif new == CLOSED:
            self.open_for = self.config.reset_timeout_s
        self.publish()

    @property
    def max_open(self) -> float:
        return max(self.config.max_reset_timeout_s, self.config.reset_timeout_s)

    # --- the operator -----------------------------------------------------------------

    def force(self, state: str | None) -> None:
        """Hold the breaker *state* (``open`` or ``closed``), or None to let traffic decide."""
        self.forced = state
        self.gen += 1
        self.probes = 0
        self.publish()

    def reset(self) -> None:
        """Drop any override and close with fresh counters and the base open period."""
        self.forced = None
        self.cb.close()
        self.open_for = self.config.reset_timeout_s
        self.open_until = 0.0
        self.gen += 1
        self.probes = 0
        self.publish()

    # --- Redis mode -------------------------------------------------------------------

    def mirror(self, snap: Snapshot, now: float) -> None:
        """Take the shared state *snap* (read at local time *now*) as this worker's."""
        if snap.version and snap.version < self.version:
            return  # an older reply than one already taken
        self.version = max(self.version, snap.version)
        self.forced = snap.forced
        self.shared_fails = snap.fails
        self.open_for = snap.open_for_s
        if snap.state != self.state:
            {OPEN: self.cb.open, HALF_OPEN: self.cb.half_open, CLOSED: self.cb.close}[snap.state]()
            self.gen += 1
            self.probes = 0
        if snap.state == OPEN:
            self.open_until = now + snap.remaining_s
        self.synced_at = now
        self.publish()

    def publish(self) -> None:
        """Report a change of the effective state (metrics, logs) once."""
        new = self.effective
        if new != self.published:
            old, self.published = self.published, new
            self._on_change(self, old, new)

    def describe(self, now: float) -> dict[str, object]:
        return {
            "state": self.effective,
            "automatic_state": self.state,
            "forced": self.forced,
            "retry_after_s": round(self.retry_after(now), 3) if self.state == OPEN else None,
            "open_for_s": self.open_for,
            "consecutive_failures": int(self.cb.fail_counter),
        }
