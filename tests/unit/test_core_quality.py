"""Selection quality on contrastive super-batches with clusters of learnable hard negatives.

For each loss kind, super-batch size B and filtering ratio f, 20 seeds of uniform,
topk and joint selection are scored by J, the selected set's batch learnability
computed the plain full-matrix way (tests/core_harness.py), and set beside long
Metropolis swap chains on the same distribution joint samples from approximately,
p(S) ~ exp(gain * L(S)).
"""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from core_harness import (SigmoidState, SoftmaxState, clip_set_loss, clustered_pair, logits,
                          sigmoid_j, sigmoid_matrix, softmax_j, swap_chain)
from jest_stream import SelectOptions, select
from jest_stream.options import DEFAULT_GAINS
from jest_stream.samplers import chunk_sizes, gumbel_topk

RATIOS = (0.5, 0.8, 0.9)
SEEDS = range(20)
KINDS = ("sigmoid_contrastive", "softmax_contrastive")


def _problem(kind: str, batch: int):
    learner, reference = clustered_pair(0, batch)
    if kind == "sigmoid_contrastive":
        s = sigmoid_matrix(learner, reference)
        return learner, reference, (lambda sets: sigmoid_j(s, sets)), (lambda inside: SigmoidState(s, inside))
    xs = (logits(learner, False), logits(reference, False))
    return learner, reference, (lambda sets: softmax_j(xs, sets)), (lambda inside: SoftmaxState(xs, inside))


@pytest.fixture(scope="module", params=[(k, b) for k in KINDS for b in (256, 1024)],
                ids=lambda p: f"{p[0].split('_')[0]}-B{p[1]}")
def measured(request):
    """{f: {method: mean J}} for one (kind, B), with the chain at the kind's default gain."""
    kind, batch = request.param
    learner, reference, set_j, state_of = _problem(kind, batch)
    out = {}
    with threadpool_limits(1):
        for f in RATIOS:
            b = round((1 - f) * batch)

            def mean_j(options: SelectOptions) -> float:
                sets = np.stack([select(b, kind=kind, learner=learner, reference=reference,
                                        options=options, seed=seed).indices for seed in SEEDS])
                return float(set_j(sets).mean())

            out[f] = {name: mean_j(SelectOptions(sampler=name)) for name in ("uniform", "topk", "joint")}
            if kind == "softmax_contrastive":
                out[f]["joint_own"] = mean_j(SelectOptions(softmax_score="own"))
            else:
                out[f]["joint_in_batch"] = mean_j(SelectOptions(first_chunk="in_batch"))
            out[f]["chain"] = swap_chain(state_of, set_j, batch, b, DEFAULT_GAINS[kind], seed=11,
                                         block=300, max_blocks=20)
    return kind, batch, out


@pytest.mark.parametrize("f", RATIOS)
def test_topk_beats_uniform(measured, f):
    """topk ranks by each example's loss in the whole super-batch (negatives included)."""
    kind, batch, out = measured
    assert out[f]["topk"] > out[f]["uniform"], (kind, batch, f, out[f])


@pytest.mark.parametrize("f", RATIOS)
def test_joint_beats_uniform(measured, f):
    kind, batch, out = measured
    assert out[f]["joint"] > out[f]["uniform"], (kind, batch, f, out[f])


def test_softmax_marginal_gain_beats_own_loss(measured):
    """Counting how a candidate raises the selected members' losses is worth it."""
    kind, batch, out = measured
    if kind != "softmax_contrastive":
        pytest.skip("softmax only")
    for f in RATIOS:
        assert out[f]["joint"] >= out[f]["joint_own"], (batch, f, out[f])


@pytest.mark.parametrize("f", (0.8, 0.9))
def test_softmax_joint_beats_topk_at_high_filtering(measured, f):
    kind, batch, out = measured
    if kind != "softmax_contrastive":
        pytest.skip("softmax only: sigmoid joint, whose first chunk sees only S_ii, is below "
                    "in-batch topk on this harness")
    assert out[f]["joint"] >= out[f]["topk"], (batch, f, out[f])


@pytest.mark.parametrize("f", (0.8, 0.9))
def test_sigmoid_in_batch_first_chunk_beats_the_diagonal_one(measured, f):
    """Seeding the first chunk with each candidate's expected pairs finds the hard-negative
    clusters that S_ii alone cannot see; at f = 0.9 that puts joint above topk."""
    kind, batch, out = measured
    if kind != "sigmoid_contrastive":
        pytest.skip("sigmoid only: softmax's first chunk is in-batch already")
    assert out[f]["joint_in_batch"] > out[f]["joint"], (batch, f, out[f])
    if f == 0.9:
        assert out[f]["joint_in_batch"] >= out[f]["topk"], (batch, f, out[f])


# The incremental softmax marginal gain against a plain full-matrix computation -------------

def full_matrix_softmax_marginal_joint(learner, reference, n_select, n_chunks, seed, gain):
    """Joint selection where candidate i's score, given the selected set S, is the change of
    the set's CLIP batch loss (summed over members) when i joins: L(S + {i}) - L(S), computed
    from scratch on the full logit matrices; given the empty set, i's loss in the whole batch."""
    xs = (logits(learner, False), logits(reference, False))
    batch = xs[0].shape[0]
    first = 0.0
    for w, x in zip((1.0, -1.0), xs):
        pos = np.diag(x)
        first = first + w * 0.5 * (np.logaddexp.reduce(x, axis=1) - pos + np.logaddexp.reduce(x, axis=0) - pos)
    rng = np.random.default_rng(seed)
    taken = np.zeros(batch, dtype=bool)
    out: list[int] = []
    for size in chunk_sizes(n_select, n_chunks):
        if out:
            grown = np.array([out + [i] for i in range(batch)])
            base = np.array([out])
            c = sum(w * (clip_set_loss(x, grown) - clip_set_loss(x, base)) for w, x in zip((1.0, -1.0), xs))
        else:
            c = first
        pick = gumbel_topk(gain * c, size, rng, taken)
        taken[pick] = True
        out.extend(pick.tolist())
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_incremental_softmax_marginal_gain_equals_full_matrix(seed):
    learner, reference = clustered_pair(seed, 40, dim=8)
    ours = select(13, kind="softmax_contrastive", learner=learner, reference=reference, seed=seed,
                  options=SelectOptions(n_chunks=4, score_gain=30.0, softmax_score="marginal")).indices
    theirs = full_matrix_softmax_marginal_joint(learner, reference, 13, 4, seed, gain=30.0)
    assert ours.tolist() == theirs.tolist()
