"""`jest-stream bench server` runs end to end (a tiny configuration: the figures of a
benchmark are not asserted in tests, only that it measures and reports them)."""
from __future__ import annotations

import json

from jest_stream.cli import main


def test_bench_server_reports_the_four_figures(capsys):
    assert main(["bench", "server", "--json", "--batch", "256", "--hidden", "16", "--rounds", "1", "--calls", "2",
                 "--echo-calls", "5", "--jobs", "3", "--seconds", "0.5", "--job-rounds", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("served_vs_inprocess", "cache_hit_vs_echo", "concurrency_gain", "fairness"):
        assert out[key] > 0, key
    assert out["fairness"] >= 1.0
    assert len(out["details"]["jobs_3_per_job_examples_per_s"]) == 3
    assert out["config"]["batch"] == 256


def test_bench_server_refuses_zero_job_rounds(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "server", "--job-rounds", "0"])
    assert "--job-rounds: must be >= 1, got 0" in capsys.readouterr().err
