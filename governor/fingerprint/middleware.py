"""The fingerprint middleware: ``-max`` models only for the official Claude Code CLI, and
key suspension for everything else.

Per request: a suspended key is refused on every governed path and model. A request for
a CLI-only model then goes through the layers (:mod:`.checks`: path gate, hard
requirements, consistency with the version tables, wrapper blocklist; then behaviour
over time per key, kept in the backend) and gets a verdict: allow, block, or block and
suspend (a strike; suspension at ``strikes_to_suspend``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import json
import logging
from typing import Any
from urllib.parse import unquote

from governor.catalog import Catalog, ModelSpec, Upstream
from governor.config import FingerprintConfig
from governor.context import ROUTES, RequestContext, Surface, lookup_model, normalise_path
from governor.degraded import degraded_for
from governor.errors import BackendError, NotFound, Overloaded, PermissionDenied, send_error
from governor.fingerprint.checks import Finding, Inspection, Inspector, header_map
from governor.fingerprint.memory import MemoryFingerprintStore
from governor.fingerprint.rules import Rules, load_rules
from governor.fingerprint.store import (
    FingerprintStore,
    Seen,
    Suspension,
    Windows,
    cleared_keys,
    store_for,
)
from governor.runtime import Governor
from governor.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("governor.fingerprint")


class Verdict(enum.Enum):
    """The outcome of the fingerprint layers for one request."""

    ALLOW = "allow"
    BLOCK = "block"
    SUSPEND = "block_and_suspend"


@dataclasses.dataclass
class Decision:
    """A verdict with its reasons (finding codes), for logs, metrics and tests."""

    verdict: Verdict
    reasons: list[str]
    soft: list[str]
    inspection: Inspection
    strikes: int = 0

    @property
    def primary(self) -> str:
        if self.reasons:
            return self.reasons[0]
        return "unknown_version" if self.inspection.table == "newer" else "ok"


def cli_only_id(model_id: str, spec: ModelSpec | None) -> bool:
    """Whether *model_id* (resolved to *spec*) is a CLI-only Claude ``-max`` model.

    ``lookup_model`` already folds case and white space (``Claude-Opus-4-7-MAX ``);
    the raw id is checked too, for a ``-max`` Claude id a config added without
    ``upstream = "anthropic"``. ``qwen3-7-max`` is a standard model: not a Claude id.
    """
    if spec is None:
        return False
    if spec.cli_only:
        return True
    ids = (model_id.strip().lower(), spec.id.lower())
    return any(i.endswith("-max") for i in ids) and (
        spec.upstream is Upstream.ANTHROPIC or any(i.startswith("claude") for i in ids)
    )


def duplicate_models(body: bytes) -> list[str]:
    """The top-level ``model`` values of a body naming the model more than once.

    Parsers disagree on which duplicate key wins; ``{"model": "<-max>", "model":
    "<standard>"}`` must not pass as a standard request to an upstream that takes the
    first. Cheap pre-test: a second ``"model"`` token or a ``\\u`` escape.
    """
    if body.count(b'"model"') < 2 and b"\\u" not in body:
        return []
    try:
        top = json.loads(body, object_pairs_hook=lambda pairs: pairs)
    except (ValueError, RecursionError):
        return []
    if not isinstance(top, list):
        return []
    models = [v for k, v in top if k == "model"]
    return [m for m in models if isinstance(m, str)] if len(models) > 1 else []


def is_cli_only(ctx: RequestContext, catalog: Catalog | None = None) -> bool:
    """Whether *ctx* names a CLI-only model, however spelled or smuggled."""
    if cli_only_id(ctx.model_id, ctx.model):
        return True
    if catalog is None or ctx.model is None:
        return False
    return any(cli_only_id(m, lookup_model(catalog, m)) for m in duplicate_models(ctx.body))


def canonical_route(scope: Scope) -> str | None:
    """The governed route a disguised path would reach once a proxy or upstream decodes it
    again (``/v1/%256Dessages``, ``/V1/Messages``, ``/v1\\messages``, ``;params``)."""
    candidates = [scope.get("path", "")]
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        candidates.append(raw.decode("latin-1"))
    for path in candidates:
        for _ in range(4):
            decoded = unquote(path)
            if decoded == path:
                break
            path = decoded
        path = path.replace("\\", "/").split(";", 1)[0].split("?", 1)[0].strip().lower()
        route = normalise_path(path)
        if route in ROUTES:
            return route
    return None


class FingerprintMiddleware:
    """Serves CLI-only ``-max`` models to the official Claude Code CLI only; suspends keys.

    Options (each defaults to ``governor.config.fingerprint``): *config* (a whole
    :class:`FingerprintConfig`), *rules* (a :class:`Rules`, else ``rules_path`` or the
    packaged rules).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        governor: Governor | None = None,
        config: FingerprintConfig | None = None,
        rules: Rules | None = None,
    ) -> None:
        self.app = app
        self.governor = governor if governor is not None else Governor()
        self.config = config if config is not None else self.governor.config.fingerprint
        self.rules = rules if rules is not None else load_rules(self.config.rules_path)
        self.inspector = Inspector(self.rules, self.config.official_entrypoints)
        self.store: FingerprintStore = store_for(self.governor.backend, self.governor.clock)
        # Redis down (fail open): strikes and suspensions of this worker, synced back later.
        self._fallback = MemoryFingerprintStore(self.governor.clock)
        self.cleared = cleared_keys(self.governor)
        # The store's epoch when this worker cached each suspension (see _suspension).
        self._epochs: dict[str, str] = {}
        self.degraded = degraded_for(self.governor)
        c = self.config
        self._windows = Windows(
            c.device_window_s,
            c.session_window_s,
            c.address_window_s,
            cap=max(c.max_devices_per_key, c.max_sessions_per_key, c.max_addresses_per_key) + 1,
        )
        metrics = self.governor.metrics
        self._decisions = metrics.counter(
            "fingerprint_decisions",
            "Fingerprint decisions on CLI-only models and suspended keys, by verdict and reason.",
            ("verdict", "reason"),
        )
        self._signals = metrics.counter(
            "fingerprint_signals",
            "Fingerprint findings (each signal of each decision), by severity and signal.",
            ("severity", "signal"),
        )
        self._backend_errors = metrics.counter(
            "fingerprint_backend_errors", "Fingerprint state operations that failed.", ("op",)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entered = await self.governor.enter(scope, receive, send)
        if entered is None:
            return
        ctx, receive, send = entered
        if ctx is None:
            route = canonical_route(scope)
            if route is not None:
                # A spelling of a governed path that escaped parsing: never let it
                # reach an app or upstream that would decode it again.
                self._decisions.labels("block", "non_canonical_path").inc()
                log.warning(
                    "fingerprint block: non-canonical path for %s",
                    route,
                    extra={"fingerprint": {"verdict": "block", "reasons": ["non_canonical_path"]}},
                )
                await send_error(
                    send,
                    NotFound(
                        "Unknown path; use the canonical API path.", code="non_canonical_path"
                    ),
                    ROUTES[route][0].shape,
                )
                return
            await self.app(scope, receive, send)
            return
        # A suspended key is refused everywhere: every model, every governed path.
        try:
            suspension = await self._suspension(ctx.key_id, ctx)
        except BackendError:
            await self._refuse_unavailable(ctx, send, "suspension")
            return
        if suspension is not None:
            await self._refuse_suspended(ctx, send, suspension)
            return
        if not is_cli_only(ctx, self.governor.catalog):
            await self.app(scope, receive, send)
            return
        try:
            decision = await self.decide(ctx, scope)
        except BackendError:
            await self._refuse_unavailable(ctx, send, "behaviour")
            return
        self._record(ctx, decision)
        if decision.verdict is Verdict.ALLOW:
            await self.app(scope, receive, send)
            return
        await self.governor.refuse(ctx, send, self._error(ctx, decision))

    # --- the decision -------------------------------------------------------------------

    async def decide(self, ctx: RequestContext, scope: Scope) -> Decision:
        """Run every layer on *ctx*; strike (and maybe suspend) on a violation."""
        inspection = self.inspector.inspect(
            ctx.surface, scope.get("query_string", b""), ctx.headers, ctx.payload
        )
        findings = inspection.findings
        if duplicate_models(ctx.body):
            inspection.add("duplicate_model", "violation")
        elif ctx.model is not None and ctx.model_id != ctx.model.id:
            # The CLI sends whatever the user configured; the catalog folds the spelling.
            inspection.add("model_id_spelling", "soft")
        if not any(f.severity != "soft" for f in findings):
            findings.extend(await self._behaviour(ctx, inspection))
        reasons = [f.code for f in findings if f.severity == "violation"]
        reasons += [f.code for f in findings if f.severity == "block"]
        soft = [f.code for f in findings if f.severity == "soft"]
        decision = Decision(Verdict.ALLOW, reasons, soft, inspection)
        if any(f.severity == "violation" for f in findings):
            record = Suspension(
                key_id=ctx.key_id,
                account=ctx.account,
                reasons=tuple(dict.fromkeys(reasons)),
                at=self.governor.clock.time(),
                model=ctx.model_id.strip()[:100],
                request_id=ctx.request_id,
            )
            self.cleared.forget(ctx.key_id)
            strikes, suspended = await self._strike(record, ctx)
            decision.strikes = strikes
            decision.verdict = Verdict.SUSPEND if suspended else Verdict.BLOCK
        elif reasons:
            decision.verdict = Verdict.BLOCK
        return decision

    async def _behaviour(self, ctx: RequestContext, inspection: Inspection) -> list[Finding]:
        c = self.config
        address = ctx.client[0] if ctx.client else ""
        action = "violation" if c.behaviour_action == "suspend" else "block"
        out: list[Finding] = []
        sender = f"{ctx.key_id} {address}"
        observe = self.store.observe(
            ctx.key_id,
            inspection.device_id or "",
            inspection.session_id or "",
            address,
            self._windows,
        )
        try:
            # Only full messages bodies: they embed the device and session ids, so an
            # identical one from elsewhere is a replay, not a coincidence.
            if ctx.surface is Surface.MESSAGES and inspection.device_id:
                digest = hashlib.sha256(ctx.body).hexdigest()
                replayed = self.store.first_sender(digest, sender, c.replay_window_s)
                # Two independent round trips (different hash slots): in parallel.
                seen, first = await asyncio.gather(observe, replayed)
            else:
                seen, first = await observe, None
        except BackendError:
            self._backend_errors.labels("behaviour").inc()
            self.degraded.mark(ctx, "fingerprint", c.fail_mode)
            if c.fail_mode == "closed":
                raise
            log.warning("fingerprint behaviour checks skipped: backend unavailable")
            return [Finding("behaviour_unavailable", "soft")]
        out += _limits(seen, c, action)
        if first is not None and first != sender:
            first_key = first.split(" ", 1)[0]
            if first_key != ctx.key_id:
                out.append(Finding("replay_other_key", "violation"))
            elif _retry(ctx):
                # The CLI retrying after a network change: same key, new address.
                out.append(Finding("retry_other_address", "soft"))
            else:
                out.append(Finding("replay_other_address", "violation"))
        return out

    # --- state, with the fail mode ------------------------------------------------------

    async def _suspension(
        self, key_id: str, ctx: RequestContext | None = None
    ) -> Suspension | None:
        now = self.governor.clock.monotonic()
        if self.cleared.trusted(key_id, now):
            return None
        found = await self._shared_suspension(key_id, ctx)
        if found is None:
            self.cleared.clear(key_id, now)
        return found

    async def _shared_suspension(
        self, key_id: str, ctx: RequestContext | None = None
    ) -> Suspension | None:
        try:
            found = await self.store.suspension(key_id)
        except BackendError:
            self._backend_errors.labels("suspension").inc()
            self.degraded.mark(ctx, "fingerprint", self.config.fail_mode)
            if self.config.fail_mode == "closed":
                raise
            # Fail open: what this worker knows (suspensions it made or saw).
            return await self._fallback.suspension(key_id)
        self.degraded.healthy("fingerprint")
        local = await self._fallback.suspension(key_id)
        if found is None and local is not None and local.by == "fingerprint-offline":
            # Made while Redis was down: persist it now that Redis answers.
            try:
                await self.store.suspend(local)
            except BackendError:
                return local
            await self._fallback.lift(key_id)
            return local
        try:
            if found is not None and local is None:
                await self._fallback.suspend(found)
                self._epochs[key_id] = await self.store.epoch()
            elif found is None and local is not None:
                if await self.store.epoch() != self._epochs.get(key_id):
                    # Redis lost its data (flushed, restarted empty), not an operator's
                    # lift: write the suspension back rather than forget it.
                    await self.store.suspend(local)
                    self._epochs[key_id] = await self.store.epoch()
                    return local
                await self._fallback.lift(key_id)  # lifted by an operator
                self._epochs.pop(key_id, None)
        except BackendError:
            return found if found is not None else local
        return found

    async def _strike(
        self, record: Suspension, ctx: RequestContext | None = None
    ) -> tuple[int, bool]:
        c = self.config
        try:
            return await self.store.strike(
                record, threshold=c.strikes_to_suspend, ttl_s=c.strike_ttl_s
            )
        except BackendError:
            self._backend_errors.labels("strike").inc()
            # Kept locally whatever the fail mode: a violation is never forgotten.
            self.degraded.mark(ctx, "fingerprint", "open")
            log.error("fingerprint strike kept locally: backend down (key=%s)", record.key_id)
            offline = dataclasses.replace(record, by="fingerprint-offline")
            return await self._fallback.strike(
                offline, threshold=c.strikes_to_suspend, ttl_s=c.strike_ttl_s
            )

    # --- answers, logs, metrics ---------------------------------------------------------

    def _error(self, ctx: RequestContext, decision: Decision) -> PermissionDenied:
        model = ctx.model_id.strip()[:100]
        if "wrong_path" in decision.reasons:
            text = (
                f"The model '{model}' is served only to the official Claude Code CLI on the "
                "Anthropic-native messages endpoint (/v1/messages)."
            )
        else:
            text = (
                f"The model '{model}' is available only through the official Claude Code "
                "CLI; this client is not permitted to use it."
            )
        if decision.verdict is Verdict.SUSPEND:
            text += (
                " This API key has been suspended for it; contact support quoting request "
                f"{ctx.request_id}."
            )
            return PermissionDenied(
                text, code="key_suspended", reason="fingerprint_suspended", should_retry=False
            )
        return PermissionDenied(
            text, code="cli_only_model", reason="fingerprint_blocked", should_retry=False
        )

    async def _refuse_suspended(
        self, ctx: RequestContext, send: Send, suspension: Suspension
    ) -> None:
        self._decisions.labels("suspended", "key_suspended").inc()
        log.info(
            "fingerprint refused: key suspended key=%s request=%s",
            ctx.key_id,
            ctx.request_id,
            extra={
                "fingerprint": {
                    "verdict": "suspended",
                    "reasons": ["key_suspended"],
                    "key_id": ctx.key_id,
                    "request_id": ctx.request_id,
                    "model": ctx.model_id.strip()[:100],
                    "suspended_at": suspension.at,
                }
            },
        )
        error = PermissionDenied(
            f"This API key ({ctx.key_id}) is suspended: a CLI-only (-max) model was used "
            "from a client other than the official Claude Code CLI. Contact support to "
            "appeal.",
            code="key_suspended",
            reason="key_suspended",
            should_retry=False,
        )
        await self.governor.refuse(ctx, send, error)

    async def _refuse_unavailable(self, ctx: RequestContext, send: Send, what: str) -> None:
        self._decisions.labels("unavailable", what).inc()
        log.error("fingerprint: backend unavailable (%s), failing closed", what)
        error = Overloaded(
            "Client checks are unavailable right now; retry shortly.",
            reason="fingerprint_unavailable",
            retry_after=1,
        )
        await self.governor.refuse(ctx, send, error)

    def _record(self, ctx: RequestContext, decision: Decision) -> None:
        insp = decision.inspection
        self._decisions.labels(decision.verdict.value, decision.primary).inc()
        for f in insp.findings:
            self._signals.labels(f.severity, f.code).inc()
        fields: dict[str, Any] = {
            "verdict": decision.verdict.value,
            "reasons": decision.reasons,
            "soft": decision.soft,
            "details": {f.code: f.detail for f in insp.findings if f.detail},
            "key_id": ctx.key_id,
            "account": ctx.account,
            "request_id": ctx.request_id,
            "model": ctx.model_id.strip()[:100],
            "path": ctx.path,
            "version": insp.version,
            "entrypoint": insp.entrypoint,
            "table": insp.table,
            "strikes": decision.strikes,
            "client": ctx.client[0] if ctx.client else None,
            "user_agent": _user_agent(ctx)[:200],
        }
        if decision.verdict is Verdict.SUSPEND:
            level = logging.ERROR
        elif decision.verdict is Verdict.BLOCK:
            level = logging.WARNING
        elif decision.soft:
            level = logging.INFO
        else:
            level = logging.DEBUG
        log.log(
            level,
            "fingerprint %s key=%s model=%s reasons=%s soft=%s version=%s entrypoint=%s",
            decision.verdict.value,
            ctx.key_id,
            fields["model"],
            ",".join(decision.reasons) or "-",
            ",".join(decision.soft) or "-",
            insp.version,
            insp.entrypoint,
            extra={"fingerprint": fields},
        )


def _limits(seen: Seen, c: FingerprintConfig, action: Any) -> list[Finding]:
    out = []
    if seen.devices > c.max_devices_per_key:
        out.append(Finding("too_many_devices", action, str(seen.devices)))
    if seen.sessions > c.max_sessions_per_key:
        out.append(Finding("too_many_sessions", action, str(seen.sessions)))
    if seen.addresses > c.max_addresses_per_key:
        out.append(Finding("too_many_addresses", action, str(seen.addresses)))
    return out


def _retry(ctx: RequestContext) -> bool:
    values, _ = header_map(ctx.headers)
    return values.get("x-stainless-retry-count", ["0"])[0] not in ("", "0")


def _user_agent(ctx: RequestContext) -> str:
    values, _ = header_map(ctx.headers)
    return " | ".join(values.get("user-agent", []))
