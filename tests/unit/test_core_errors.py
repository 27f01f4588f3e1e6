"""Bad input to the selection core raises ValueError naming the argument."""
from __future__ import annotations

import numpy as np
import pytest

from jest_stream import Embeddings, Losses, SelectOptions, select

rng = np.random.default_rng(0)
L8 = Losses(rng.random(8))
EMB = Embeddings(rng.random((8, 4), dtype=np.float32), rng.random((8, 4), dtype=np.float32), 2.0, -1.0)


def per_example(**overrides):
    args = dict(n_select=3, kind="per_example", learner=L8, reference=L8)
    args.update(overrides)
    n = args.pop("n_select")
    rule = {k: args.pop(k) for k in ("score", "sampler", "n_chunks", "score_gain") if k in args}
    return select(n, **args, options=SelectOptions(**rule))


@pytest.mark.parametrize("overrides,match", [
    ({"learner": Losses(np.array([1.0, np.nan, 0, 0, 0, 0, 0, 0]))}, r"learner.losses: 1 value\(s\) are NaN or inf"),
    ({"reference": Losses(np.array([np.inf] * 8))}, r"reference.losses: 8 value\(s\) are NaN or inf"),
    ({"reference": Losses(np.zeros(7))}, "reference: 7 examples but learner has 8"),
    ({"learner": Losses(np.zeros((8, 2)))}, r"learner.losses: expected shape \(B,\)"),
    ({"n_select": 0}, "n_select: must be between 1 and the super-batch size B=8, got 0"),
    ({"n_select": 9}, "n_select: must be between 1 and the super-batch size B=8, got 9"),
    ({"n_select": 2.5}, "n_select: expected an integer"),
    ({"kind": "hinge"}, "kind: unknown value 'hinge'"),
    ({"score": "fun"}, "score: unknown value 'fun'"),
    ({"sampler": "greedy"}, "sampler: unknown value 'greedy'"),
    ({"n_chunks": 0}, "n_chunks: expected an integer >= 1"),
    ({"score_gain": float("nan")}, "score_gain: must be a positive finite number"),
    # 0 would mean "unset" on the wire: refused, so local and remote never differ on it
    ({"score_gain": 0.0}, "score_gain: must be a positive finite number"),
    ({"seed": -1}, "seed: expected a non-negative integer"),
    ({"learner": EMB}, "learner: kind 'per_example' expects Losses, got Embeddings"),
    ({"reference": None}, "reference: required by this score rule"),
])
def test_per_example_bad_input(overrides, match):
    with pytest.raises(ValueError, match=match):
        per_example(**overrides)


@pytest.mark.parametrize("learner,match", [
    (Embeddings(np.zeros((8, 4), np.float32), np.zeros((8, 5), np.float32)), "image width 4 != text width 5"),
    (Embeddings(np.zeros((8, 4), np.float32), np.zeros((7, 4), np.float32)), "image has 8 rows but text has 7"),
    (Embeddings(np.full((8, 4), np.nan, np.float32), np.zeros((8, 4), np.float32)), "learner.image: 32 value"),
    (Embeddings(np.zeros(8, np.float32), np.zeros((8, 4), np.float32)), r"learner.image: expected shape \(B, d\)"),
    (Embeddings(np.zeros((8, 4), np.float32), np.zeros((8, 4), np.float32), float("inf")), "learner.logit_scale: must be finite"),
])
def test_contrastive_bad_input(learner, match):
    with pytest.raises(ValueError, match=match):
        select(3, kind="sigmoid_contrastive", learner=learner, reference=EMB)


def test_embeddings_of_another_batch_size_are_rejected():
    small = Embeddings(EMB.image[:5], EMB.text[:5], 2.0)
    with pytest.raises(ValueError, match="reference: 8 examples but learner has 5"):
        select(3, kind="softmax_contrastive", learner=small, reference=EMB)


def test_overflowing_scores_are_refused_not_duplicated():
    rng = np.random.default_rng(0)
    zi = rng.standard_normal((8, 4)).astype(np.float32)
    huge = Embeddings(zi, zi, 3e38, -5.0)
    with pytest.raises(ValueError, match="learner: scores overflowed"):
        select(8, kind="sigmoid_contrastive", learner=huge, reference=EMB, seed=1)


@pytest.mark.parametrize("kind", ["sigmoid_contrastive", "softmax_contrastive"])
def test_conditional_scores_refuse_an_unknown_lookahead(kind):
    """A caller of the trackers without SelectOptions (a bench, another library) gets the
    field named, for both kinds alike, never JEST's rule in silence."""
    from jest_stream.conditional import conditional_scores

    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, 4)).astype(np.float32)
    emb = Embeddings(z, z, 10.0, -5.0 if kind.startswith("sigmoid") else 0.0)
    with pytest.raises(ValueError, match="lookahead: unknown value 'In_Batch'"):
        conditional_scores(kind, emb, emb, lookahead="In_Batch")
