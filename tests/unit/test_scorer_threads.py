"""The embedded scorer bounds its threads beside torch: ONNX Runtime's intra-op pool
defaults to the cores torch leaves, and numpy's BLAS is held to ``blas_threads``
during each Select (threadpoolctl), then given back."""
from __future__ import annotations

import os

import pytest
import torch
from threadpoolctl import threadpool_info

from jest_stream import LocalScorer, per_example_cross_entropy
from jest_stream.client.scorer import SelectCall
from jest_stream.server.engine import ScoringEngine


def blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_ort_threads_default_to_the_cores_torch_leaves(per_example_model):
    with LocalScorer(per_example_model) as scorer:
        expected = max(1, (os.cpu_count() or 1) // torch.get_num_threads())
        assert scorer.intra_op_threads == expected
        session = scorer.engine.models["digits"].session
        assert session.get_session_options().intra_op_num_threads == expected
    with LocalScorer(per_example_model, intra_op_threads=3) as scorer:
        assert scorer.engine.models["digits"].session.get_session_options().intra_op_num_threads == 3


def test_blas_is_held_to_its_limit_during_a_select(per_example_model, digits, monkeypatch):
    seen: list[set[int]] = []
    real_select = ScoringEngine.select

    def observed(self, *args, **kwargs):  # the real select runs; we only look at the threads
        seen.append(blas_threads())
        return real_select(self, *args, **kwargs)

    monkeypatch.setattr(ScoringEngine, "select", observed)
    x, y = digits["x"][:64], digits["y"][:64]
    learner = per_example_cross_entropy(torch.zeros(64, 10), torch.from_numpy(y))
    with LocalScorer(per_example_model, blas_threads=1) as scorer:
        before = blas_threads()
        scorer.select(SelectCall(model="digits", job_id="t", learner=learner, n_select=16,
                                 inputs=lambda: {"x": x, "y": y}, seed=0))
        assert blas_threads() == before  # given back after the Select
    assert seen == [{1}]


@pytest.mark.parametrize("field", ["intra_op_threads", "blas_threads"])
def test_bad_thread_counts_are_refused(per_example_model, field):
    with pytest.raises(ValueError, match=field):
        LocalScorer(per_example_model, **{field: 0})

