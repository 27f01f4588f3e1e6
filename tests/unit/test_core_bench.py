"""The selection benchmarks run end to end at tiny sizes on the CPU, so they cannot rot:
``bench selection`` over numpy and torch, and ``bench gpu`` through torch on the CPU
(it has never run on a GPU here)."""
from __future__ import annotations

import json

import pytest

from jest_stream.cli import main

pytest.importorskip("torch")


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_selection_times_numpy_and_torch_side_by_side(capsys):
    assert main(["bench", "selection", "--sizes", "256", "--dim", "16", "--repeats", "1",
                 "--backend", "numpy,torch", "--threads", "1", "--json"]) == 0
    cases = _json(capsys)["cases"]
    assert [c["backend"] for c in cases] == ["numpy", "torch"]
    assert all(c["ms"] > 0 and c["floor_ms"] > 0 for c in cases)
    assert "vs_numpy" in cases[1] and "naive_ms" in cases[0]


def test_bench_selection_refuses_an_unknown_backend(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "selection", "--backend", "numpy,jax"])
    assert "--backend: unknown ['jax']" in capsys.readouterr().err


def test_bench_gpu_runs_through_torch_on_the_cpu(capsys):
    assert main(["bench", "gpu", "--sizes", "384", "--dim", "16", "--device", "cpu",
                 "--backends", "torch", "--host-size", "256", "--repeats", "1",
                 "--threads", "1", "--json"]) == 0
    out = _json(capsys)
    got = {(c["backend"], c["kind"]) for c in out["cases"]}
    assert got == {("torch", "sigmoid_contrastive"), ("torch", "softmax_contrastive"),
                   ("numpy", "sigmoid_contrastive"), ("numpy", "softmax_contrastive")}
    assert all(c["ms"] > 0 and c["floor_ms"] > 0 and c["b"] == round(0.2 * c["B"]) for c in out["cases"])
    steps = out["trainer_step"]  # the trainer-side selection step, on the same torch device
    assert [(c["kind"], c["B"], c["device"]) for c in steps] == [("sigmoid_contrastive", 384, "cpu"),
                                                                 ("softmax_contrastive", 384, "cpu")]
    assert all(c["step_ms"] > 0 for c in steps)


def test_bench_gpu_skips_what_the_time_budget_leaves(capsys):
    assert main(["bench", "gpu", "--sizes", "256", "--dim", "8", "--device", "cpu", "--backends", "torch",
                 "--host-size", "0", "--repeats", "1", "--budget-s", "0", "--threads", "1", "--json"]) == 0
    out = _json(capsys)
    assert out["cases"] == [] and out["trainer_step"] == []
    assert [(s["kind"], s["why"]) for s in out["skipped"]] == [
        ("sigmoid_contrastive", "time budget spent"), ("softmax_contrastive", "time budget spent"),
        ("trainer_step", "time budget spent")]
