"""The fault table: every fault test records what it did and what governor did.

A pytest plugin (loaded by tests/conftest.py). Fault tests take the ``faults`` fixture
and call ``faults.record(...)``; at the end of the session the table is written to
docs/faults.md, **only when asked** (``--faults-report`` or ``GOVERNOR_FAULTS_REPORT=1``),
so a CI run never dirties the tree. Regenerate it with::

    python -m tests.faults_report          # runs tests/test_faults*.py, writes the table

Rows are sorted by fault, so the file changes only where results (or timings) do.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "faults.md"
OPTION = "--faults-report"


@dataclasses.dataclass(frozen=True)
class Row:
    """One fault tried and what governor did."""

    fault: str
    guard: str
    expected: str
    observed: str
    limits_held: bool
    nothing_lost: bool
    recovery_s: float | None = None
    test: str = ""


class FaultLog:
    """Rows recorded during the session."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.failed: set[str] = set()

    def record(
        self,
        fault: str,
        guard: str,
        expected: str,
        observed: str,
        *,
        limits_held: bool = True,
        nothing_lost: bool = True,
        recovery_s: float | None = None,
        test: str = "",
    ) -> None:
        assert limits_held, f"{fault}: limits not held: {observed}"
        assert nothing_lost, f"{fault}: something lost: {observed}"
        self.rows.append(
            Row(fault, guard, expected, observed, limits_held, nothing_lost, recovery_s, test)
        )


_LOG = FaultLog()


class _Recorder:
    """The ``faults`` fixture: :meth:`FaultLog.record` stamped with the test's id."""

    def __init__(self, log: FaultLog, test: str) -> None:
        self._log = log
        self._test = test

    def record(self, fault: str, guard: str, expected: str, observed: str, **kw: object) -> None:
        self._log.record(fault, guard, expected, observed, test=self._test, **kw)  # type: ignore[arg-type]


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> _Recorder:
    """Record a row of the fault table (docs/faults.md)."""
    return _Recorder(_LOG, request.node.nodeid)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION,
        action="store_true",
        default=False,
        help="write docs/faults.md from the fault tests' results",
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _LOG.failed.add(report.nodeid)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row], failed: set[str]) -> str:
    lines = [
        "# Faults tried and what governor did",
        "",
        "Generated from the fault suite's results (`tests/test_faults*.py`) by",
        "`python -m tests.faults_report`; do not edit by hand. See docs/reliability.md for",
        "the fail modes. *Recovery*: real seconds from the fault's end (Redis back, proxy",
        "restored) until governor served without degradation and every degraded gauge was",
        "back at 0; `-` where nothing had to recover.",
        "",
        "| Fault | Guard / backend | Expected | Observed | Limits held | Nothing lost | Recovery |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r.fault, r.guard, r.test)):
        ok = row.test not in failed
        recovery = "-" if row.recovery_s is None else f"{row.recovery_s:.2f} s"
        lines.append(
            "| "
            + " | ".join(
                [
                    _cell(row.fault),
                    _cell(row.guard),
                    _cell(row.expected),
                    _cell(row.observed if ok else "FAILED: " + row.observed),
                    "yes" if row.limits_held and ok else "NO",
                    "yes" if row.nothing_lost and ok else "NO",
                    recovery,
                ]
            )
            + " |"
        )
    lines.append("")
    return "\n".join(lines)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    asked = session.config.getoption(OPTION, default=False) or os.environ.get(
        "GOVERNOR_FAULTS_REPORT", ""
    ) not in ("", "0")
    if not asked or not _LOG.rows:
        return
    REPORT.write_text(render(_LOG.rows, _LOG.failed), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the fault suite and write docs/faults.md."""
    args = list(sys.argv[1:] if argv is None else argv)
    tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_faults*.py"))
    return int(pytest.main(["-q", "-p", "no:cacheprovider", OPTION, *tests, *args]))


if __name__ == "__main__":
    raise SystemExit(main())
