"""Smoke tests of the benchmarks so they cannot rot: tiny inputs, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import loadgen, micro, run
from examples.mock_upstream import LoadStats, MockUpstream, max_in_window
from tests.helpers import call


async def test_micro_benchmark_runs_every_present_layer() -> None:
    """The micro-benchmark runs the bare app, every layer present and the full stack."""
    results = await micro.main_async(requests=20, repeat=1)
    names = [name for name, _ in results]
    assert names[0] == "bare app"
    assert names[-1] == "full stack (wrap)"
    assert "ContextMiddleware" in names
    assert all(us > 0 for _, us in results)
    assert "| full stack (wrap) |" in micro.report(results)


async def test_redis_counter_counts_commands_and_restores_redis_py() -> None:
    """The Redis counter counts what redis-py sends and puts redis-py back afterwards."""
    import fakeredis
    from redis.asyncio.client import Redis

    original = Redis.execute_command
    client = fakeredis.FakeAsyncRedis()
    counter = micro.RedisCounter()
    with counter.patched():
        await client.set("k", "1")
        await client.get("k")
    assert counter.commands == 2
    assert Redis.execute_command is original
    await client.aclose()


@pytest.mark.redis
async def test_micro_benchmark_redis_rows_count_what_governor_sends() -> None:
    """On Redis the full stack sends 6 script calls per request, 3 round trips before the
    app; with 64 requests at once auto-pipelining shares the round trips."""
    from tests import conftest

    await (await conftest.real_redis_or_skip()).aclose()
    out = await micro.redis_variants(conftest.REDIS_URL, 20)
    assert abs(out["commands_per_request"] - 6) < 0.5
    assert out["admission_round_trips"] == 3
    concurrent = out["concurrent"]
    assert abs(concurrent["commands_per_request"] - 6) < 0.5
    assert concurrent["round_trips_per_request"] < 3
    assert "64 requests at once (auto-pipelined)" in micro.redis_report(out)


def test_max_in_window_is_the_busiest_sliding_window() -> None:
    """The busiest window counts arrivals less than a window apart."""
    assert max_in_window([], 60) == 0
    assert max_in_window([0.0, 30.0, 59.9, 60.0], 60) == 3
    assert max_in_window([0.0, 10.0, 59.9, 60.0, 61.0], 60) == 4
    assert max_in_window([0.0, 1.0, 2.0], 1.5) == 2


async def test_mock_stats_report_peak_in_flight_and_reset() -> None:
    """The mock's stats report requests and peaks per model, and reset to zero."""
    mock = MockUpstream()
    body = {"model": "gpt-5-5", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        assert (await call(mock, path="/v1/chat/completions", json_body=body)).status == 200
    stats = (await call(mock, "GET", "/mock/stats", query="window_s=60")).json()
    model = stats["models"]["gpt-5-5"]
    assert (model["requests"], model["peak_in_flight"], model["in_flight"]) == (3, 1, 0)
    assert model["per_window"] == [3]
    assert model["max_in_sliding_window"] == 3
    assert (await call(mock, "POST", "/mock/stats/reset")).status == 200
    assert (await call(mock, "GET", "/mock/stats")).json()["requests"] == 0
    assert (await call(mock, "GET", "/mock/stats", query="window_s=0")).status == 400


def test_load_stats_peak_counts_concurrent_requests() -> None:
    """Overlapping requests raise the peak; a reset keeps the ones still running."""
    stats = LoadStats()
    stats.enter("m")
    stats.enter("m")
    stats.leave("m")
    stats.reset()
    assert stats.snapshot()["models"]["m"]["peak_in_flight"] == 1
    stats.leave("m")
    assert stats.snapshot()["in_flight"] == 0


def test_loadgen_summary_on_tiny_input() -> None:
    """The load generator's summary reports percentiles of what it saw."""
    stats = loadgen.Stats(sent=3, elapsed=1.0, latencies=[0.001, 0.002, 0.003])
    stats.statuses[200] = 3
    summary = stats.summary()
    assert summary["rps"] == 3.0
    assert summary["p50_ms"] == pytest.approx(2.0, abs=0.01)
    assert json.loads(loadgen.chat_body("gpt-5-5", True))["stream"] is True


def _cell(target: str, backend: str, workers: int, c: int, rps: float, **kw: Any) -> dict[str, Any]:
    cell: dict[str, Any] = {
        "target": target,
        "backend": backend,
        "workers": workers,
        "stream": False,
        "concurrency": c,
        "rate": None,
        "requests": int(rps),
        "errors": 0,
        "elapsed": 1.0,
        "rps": rps,
        "p50_ms": 10.0 if backend == "-" else 10.5,
        "p95_ms": 12.0,
        "p99_ms": 14.0,
        "client_cpu_s": 0.1,
        "cpu_us_per_req": 200.0,
        "mock_cpu_us_per_req": 80.0,
        "client_cpu_us_per_req": 20.0,
        "client_cpu_pct": 10.0,
        "proxy_core_busy_pct": 99.0,
        "client_core_busy_pct": 60.0,
        "peak_rss_mb": 60.0,
        "redis_cmds_per_req": None,
        "redis_cmds_raw_per_req": None,
        "redis_background_per_s": None,
    }
    cell.update(kw)
    return cell


def _results() -> dict[str, Any]:
    cells = [
        _cell("bare", "-", 1, 64, 4000.0),
        _cell("governed memory", "memory", 1, 64, 3800.0),
        _cell("governed redis", "redis", 1, 64, 3000.0, redis_cmds_per_req=4.0),
        _cell("bare", "-", 1, 1, 1000.0),
        _cell("governed redis", "redis", 1, 1, 900.0, redis_cmds_per_req=4.0),
    ]
    cells += [dict(c, stream=True) for c in cells]
    layers = ["ContextMiddleware"]
    return {
        "meta": {
            "date": "2026-01-01 00:00 UTC",
            "mode": "quick",
            "cpu": "test cpu",
            "cores": 2,
            "python": "3.x",
            "client": "wrk (1 thread)",
            "layers": layers,
            "absent": ["AdmissionMiddleware", "RateGuardMiddleware"],
            "duration": 1.0,
            "run_id": "test",
        },
        "micro": {
            "requests": 10,
            "repeat": 1,
            "results": [
                {"name": "bare app", "us": 1.0},
                {"name": "full stack (wrap)", "us": 30.0},
            ],
            "redis": {
                "requests": 10,
                "redis_version": "7",
                "layers": [
                    {
                        "name": "full stack (wrap)",
                        "us": 100.0,
                        "commands_per_request": 0.0,
                        "round_trips_per_request": 0.0,
                        "admission_round_trips": 0,
                    }
                ],
                "us": 100.0,
                "commands_per_request": 0.0,
                "round_trips_per_request": 0.0,
                "admission_round_trips": 0,
            },
        },
        "matrix": {
            "cells": cells,
            "open_cells": [
                _cell("bare", "-", 1, 0, 400.0, rate=400.0),
                _cell("governed redis", "redis", 1, 0, 400.0, rate=400.0),
            ],
            "redis_version": "7",
            "proxy_cores": [0],
            "client_cores": [1],
        },
        "invariants": run.invariant_verdict(
            layers=layers,
            workers=2,
            clients=80,
            latency_ms=50,
            duration=1.0,
            concurrency_limit=8,
            rpm_limit=600,
            peak=80,
            max_per_minute=700,
            per_window=[700],
            summary={"statuses": {200: 700}, "errors": {}},
        ),
    }


def test_report_renders_tables_targets_and_plots(tmp_path: Path) -> None:
    """The report, its JSON and its plots are written from a tiny set of results."""
    results = _results()
    run.write_results(results, tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert "| governed memory | 64 | 3,800 |" in report
    assert "95%" in report  # memory keeps 3800/4000 of the bare proxy's req/s
    assert "n/a (no layer uses Redis yet)" in report
    assert "| governed redis | 400 | 400 | 10.50 |" in report  # the open-loop table
    assert "FAIL (not enforced: AdmissionMiddleware absent)" in report
    assert {p.name for p in tmp_path.glob("*.png")} == {"throughput.png", "latency.png", "cpu.png"}
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["run_id"] == "test"


def test_added_latency_and_ratios_compare_with_the_bare_proxy_of_the_same_cell() -> None:
    """Governor's cost is measured against the bare proxy of the same mode and clients."""
    rows = run.with_baseline(_results()["matrix"]["cells"])
    redis64 = next(r for r in rows if r["target"] == "governed redis" and r["concurrency"] == 64)
    assert redis64["rps_ratio"] == pytest.approx(0.75)
    assert redis64["added_p50_ms"] == pytest.approx(0.5)
    bare = next(r for r in rows if r["target"] == "bare")
    assert bare["rps_ratio"] is None


def test_invariant_verdict_passes_or_names_the_absent_layer() -> None:
    """Invariants held pass; broken ones name the layer that would enforce them if absent."""
    common: dict[str, Any] = {
        "workers": 2,
        "clients": 80,
        "latency_ms": 50,
        "duration": 1.0,
        "concurrency_limit": 8,
        "rpm_limit": 600,
        "per_window": [],
        "summary": {},
    }
    held = run.invariant_verdict(
        layers=["AdmissionMiddleware"], peak=8, max_per_minute=600, **common
    )
    assert held["passed"]
    broken = run.invariant_verdict(
        layers=["AdmissionMiddleware"], peak=9, max_per_minute=601, **common
    )
    assert broken["concurrency"] == "FAIL"
    assert broken["rpm"] == "FAIL (not enforced: RateGuardMiddleware absent)"


def test_benchmark_configs_load_with_the_limits_they_promise() -> None:
    """bench.toml raises gpt-5-5's limits far above a run; invariants.toml sets low ones."""
    import governor

    bench = governor.load_config(run.BENCH_TOML)
    assert bench.demo_keys
    fast = bench.catalog()["gpt-5-5"]
    assert (fast.concurrency or 0) >= 10_000
    assert (fast.rpm or 0) >= 10**8
    low = governor.load_config(run.INVARIANTS_TOML).catalog()["gpt-5-5"]
    assert low.concurrency == 8
    assert low.rpm is not None
    assert low.rpm < 160 * 60  # less than 8 slots x 50 ms could admit in a minute
    assert run.stack_layers(run.BENCH_TOML)[0] == "ContextMiddleware"


def test_bare_proxy_serves_the_forwarding_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bare proxy has the forwarding routes of the demo and no governor."""
    from benchmarks import bare_proxy

    monkeypatch.setenv(bare_proxy.UPSTREAM_ENV, "http://127.0.0.1:1")
    app = bare_proxy.create_app()
    paths = {getattr(r, "path", None) for r in app.routes}
    assert "/v1/managed/chat/completions" in paths
    assert "/v1/messages" in paths
