"""Client-fingerprint enforcement: CLI-only ``-max`` models for the official Claude Code
CLI only, and key suspension for every other client (see docs/fingerprint.md)."""

from __future__ import annotations

from governor.fingerprint.admin import Suspensions, admin_routes
from governor.fingerprint.checks import Finding, Inspection, Inspector
from governor.fingerprint.middleware import (
    Decision,
    FingerprintMiddleware,
    Verdict,
    canonical_route,
    cli_only_id,
    duplicate_models,
    is_cli_only,
)
from governor.fingerprint.rules import Rules, load_rules, rules_from_mapping
from governor.fingerprint.store import FingerprintStore, Suspension, store_for

__all__ = [
    "Decision",
    "Finding",
    "FingerprintMiddleware",
    "FingerprintStore",
    "Inspection",
    "Inspector",
    "Rules",
    "Suspension",
    "Suspensions",
    "Verdict",
    "admin_routes",
    "canonical_route",
    "cli_only_id",
    "duplicate_models",
    "is_cli_only",
    "load_rules",
    "rules_from_mapping",
    "store_for",
]
