"""Load: 16 concurrent client jobs against one scorer on loopback (``jest-stream bench soak``).

Zero errors (failed calls or wrong answers), Select p50/p99 reported, the scorer's
resident memory after the run within 10% of its value after warm-up (no leak), the
reference cache within its byte budget (the budget is smaller than the jobs' reference
outputs, so it evicts all the time), every job served, and a clean SIGTERM exit.
The default run is short (16 jobs x 8 s); the full 60 s soak is marked slow.
"""
from __future__ import annotations

import json
import math

import pytest

from jest_stream.cli import main as cli_main

CACHE_BUDGET = 512 << 10


def soak(capsys, per_example_model: str, sigmoid_model: str, seconds: int, warmup: int) -> dict:
    """Run the benchmark through the CLI, as a user would, and parse its JSON."""
    code = cli_main(["bench", "soak", "--json", "--jobs", "16", "--seconds", str(seconds), "--warmup", str(warmup),
                     "--cache-bytes", str(CACHE_BUDGET), "--model", f"digits={per_example_model}",
                     "--model", f"siglip={sigmoid_model}"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    with capsys.disabled():  # the figures belong in the test log
        print(f"\nsoak {seconds}s: " + json.dumps({k: v for k, v in result.items() if k != "per_job_calls"}))
    return {**result, "exit": code}


def check(result: dict, seconds: int) -> None:
    assert {"jobs", "seconds", "errors", "p50_ms", "p99_ms", "rss_growth"} <= set(result)
    assert result["errors"] == 0, result["error_samples"]
    assert result["server_failed_calls"] == 0
    assert result["jobs"] == 16 and result["seconds"] >= seconds
    assert math.isfinite(result["p50_ms"]) and 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["rss_growth"] <= 0.10, (result["rss_warm_mb"], result["rss_end_mb"])
    assert 0 < result["cache_bytes"] <= result["cache_budget"] == CACHE_BUDGET
    assert 0 < result["cache_hit_ratio"] < 1  # the cache hits and evicts
    assert len(result["per_job_calls"]) == 16 and min(result["per_job_calls"].values()) > 0  # no job starved
    assert result["server_exit"] == 0  # drained and exited cleanly on SIGTERM
    assert result["ok"] and result["exit"] == 0


@pytest.mark.timeout(240)
def test_sixteen_jobs_short(capsys, per_example_model, sigmoid_model):
    check(soak(capsys, per_example_model, sigmoid_model, seconds=8, warmup=4), 8)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sixteen_jobs_for_a_minute(capsys, per_example_model, sigmoid_model):
    check(soak(capsys, per_example_model, sigmoid_model, seconds=60, warmup=10), 60)
