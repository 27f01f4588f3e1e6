"""The selection core against the paper's claims and against plain full-matrix code.

Every reference implementation here builds the whole B x B score matrix on purpose:
it is the obvious, slow version of what jest_stream computes incrementally.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from jest_stream import Embeddings, Losses, SelectOptions, select
from jest_stream.samplers import chunk_sizes, gumbel_topk, joint, topk
from jest_stream.conditional import softplus_colsum

B = 256
D = 16


def _unit(z: np.ndarray) -> np.ndarray:
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def make_pair(seed: int, batch: int = B, dim: int = D, scale: float = 10.0, bias: float = -5.0):
    """Learner and reference embeddings of one super-batch: the reference matches images to
    texts cleanly; the learner has learned each example to a different degree."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((batch, dim))
    v = u + 0.6 * rng.standard_normal((batch, dim))
    quality = rng.uniform(0.0, 1.0, (batch, 1))
    learned = quality * u + (1 - quality) * rng.standard_normal((batch, dim))
    reference = Embeddings(_unit(u), _unit(v), scale, bias)
    learner = Embeddings(_unit(learned), _unit(v), scale, bias)
    return learner, reference


def sigmoid_matrix(learner: Embeddings, reference: Embeddings) -> np.ndarray:
    """S_ij = nll_learner(i, j) - nll_reference(i, j), the full B x B way."""
    s = 0.0
    for weight, m in ((1.0, learner), (-1.0, reference)):
        x = m.logit_scale * (m.image.astype(np.float64) @ m.text.T.astype(np.float64)) + m.logit_bias
        y = -np.ones_like(x)
        np.fill_diagonal(y, 1.0)
        s = s + weight * np.logaddexp(0.0, -y * x)
    return s


def set_learnability(s: np.ndarray, idx: np.ndarray) -> float:
    """Joint learnability of a set: its pairwise sum, per example (SigLIP's batch loss)."""
    return float(s[np.ix_(idx, idx)].sum() / len(idx))


def gibbs_chain(s: np.ndarray, n_select: int, rng: np.random.Generator, block: int = 2000,
                max_blocks: int = 25) -> float:
    """Metropolis swap chain on p(S) ~ exp(sum_{i,j in S} s_ij), run until the mean
    learnability of a block of moves stops rising; returns that mean."""
    batch = s.shape[0]
    m = s + s.T
    inside = np.zeros(batch, dtype=bool)
    inside[rng.choice(batch, n_select, replace=False)] = True
    r = m[:, inside].sum(axis=1)  # r_x = sum_{k in S} (s_xk + s_kx)
    current = float(s[np.ix_(inside, inside)].sum())
    previous = -np.inf
    for _ in range(max_blocks):
        total = 0.0
        for _ in range(block):
            i = rng.choice(np.flatnonzero(inside))
            j = rng.choice(np.flatnonzero(~inside))
            delta = -(s[i, i] + r[i] - m[i, i]) + (s[j, j] + r[j] - m[j, i])
            if np.log(rng.random()) < delta:
                inside[i], inside[j] = False, True
                r += m[:, j] - m[:, i]
                current += delta
            total += current
        mean = total / block / n_select
        if mean <= previous * 1.005:
            return max(mean, previous)
        previous = mean
    return previous


# 1. The paper's properties on sigmoid-contrastive scores ----------------------------------

@pytest.fixture(scope="module")
def sigmoid_problem():
    learner, reference = make_pair(seed=7)
    return learner, reference, sigmoid_matrix(learner, reference)


@pytest.fixture(scope="module")
def learnability_by_ratio(sigmoid_problem):
    learner, reference, s = sigmoid_problem
    out = {}
    for f in (0.5, 0.8, 0.9):
        b = round((1 - f) * B)
        joint_l = [set_learnability(s, select(b, kind="sigmoid_contrastive", learner=learner,
                                               reference=reference, options=SelectOptions(n_chunks=16), seed=seed).indices)
                   for seed in range(20)]
        uniform_l = [set_learnability(s, select(b, kind="sigmoid_contrastive", learner=learner,
                                                 reference=reference, options=SelectOptions(sampler="uniform"), seed=seed).indices)
                     for seed in range(20)]
        chain = gibbs_chain(s, b, np.random.default_rng(11))
        out[f] = (float(np.mean(joint_l)), float(np.mean(uniform_l)), chain)
    return out


@pytest.mark.parametrize("f", [0.5, 0.8, 0.9])
def test_joint_beats_uniform_and_matches_long_gibbs_chain(learnability_by_ratio, f):
    joint_l, uniform_l, chain = learnability_by_ratio[f]
    assert chain > 0 and joint_l > 0
    assert joint_l > uniform_l + 0.5 * abs(uniform_l) + 1.0, (joint_l, uniform_l)
    assert joint_l >= 0.9 * chain, f"joint {joint_l:.3f} < 90% of Gibbs chain {chain:.3f} at f={f}"


def test_joint_learnability_rises_with_filtering_ratio(learnability_by_ratio):
    by_f = [learnability_by_ratio[f][0] for f in (0.5, 0.8, 0.9)]
    assert by_f[0] < by_f[1] < by_f[2], by_f


# 2. Joint selection uses the pairwise terms ------------------------------------------------

class MatrixScores:
    """Conditional scores from an explicit score matrix: c_i = S_ii + sum_{k in S} (S_ik + S_ki)."""

    def __init__(self, s: np.ndarray):
        self.s = s
        self.batch_size = s.shape[0]

    def diagonal(self) -> np.ndarray:
        return np.diag(self.s).copy()

    def initial(self, n_select: int) -> np.ndarray:
        self.c = self.diagonal()
        return self.c

    def update(self, chunk: np.ndarray) -> np.ndarray:
        self.c = self.c + self.s[:, chunk].sum(axis=1) + self.s[chunk, :].sum(axis=0)
        return self.c


def clustered_matrix(seed: int, batch: int = 128, n_clusters: int = 16, off: float = 2.0) -> np.ndarray:
    """Equal diagonals; large positive scores between members of the same cluster
    (batch-dependent hard negatives), small noise elsewhere."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_clusters, batch)
    s = 0.05 * rng.standard_normal((batch, batch))
    s[labels[:, None] == labels[None, :]] += off
    np.fill_diagonal(s, 1.0)
    return s


def _mean_learnability(s: np.ndarray, pick) -> float:
    return float(np.mean([set_learnability(s, pick(seed)) for seed in range(20)]))


def test_joint_exploits_pairwise_hard_negatives():
    s = clustered_matrix(seed=3)
    b = 32
    rng_of = np.random.default_rng
    joint_l = _mean_learnability(s, lambda seed: joint(MatrixScores(s), b, rng_of(seed), n_chunks=16))
    topk_l = _mean_learnability(s, lambda seed: topk(np.diag(s), b))
    independent_l = _mean_learnability(s, lambda seed: joint(MatrixScores(s), b, rng_of(seed), n_chunks=1))
    assert joint_l > 1.5 * topk_l and joint_l > 1.5 * independent_l, (joint_l, topk_l, independent_l)


def test_joint_gains_nothing_on_a_diagonal_matrix():
    rng = np.random.default_rng(5)
    s = np.diag(rng.normal(0.0, 1.0, 128))
    b = 32
    rng_of = np.random.default_rng
    joint_l = _mean_learnability(s, lambda seed: joint(MatrixScores(s), b, rng_of(seed), n_chunks=16))
    independent_l = _mean_learnability(s, lambda seed: joint(MatrixScores(s), b, rng_of(seed + 100), n_chunks=1))
    assert abs(joint_l - independent_l) < 0.1 * abs(independent_l) + 0.05, (joint_l, independent_l)


# 3. Per-example scores: joint == independent exp-weighted sampling; topk exact ------------

def exact_inclusion(weights: np.ndarray, n_select: int) -> np.ndarray:
    """Inclusion probabilities of successive sampling without replacement, by enumeration."""
    incl = np.zeros(len(weights))
    for seq in itertools.permutations(range(len(weights)), n_select):
        p, left = 1.0, weights.sum()
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        incl[list(seq)] += p
    return incl


def _max_z(freq_counts: np.ndarray, probs: np.ndarray, runs: int) -> float:
    se = np.sqrt(probs * (1 - probs) / runs)
    return float(np.max(np.abs(freq_counts / runs - probs) / se))


@pytest.fixture(scope="module")
def per_example_case():
    rng = np.random.default_rng(0)
    learner = rng.uniform(0.0, 3.0, 8)
    reference = rng.uniform(0.0, 1.0, 8)
    scores = learner - reference
    return learner, reference, exact_inclusion(np.exp(scores), 3)


def test_per_example_joint_matches_independent_exp_weighted_sampling(per_example_case):
    learner, reference, probs = per_example_case
    runs = 4000
    counts = np.zeros(8)
    for seed in range(runs):
        idx = select(3, kind="per_example", learner=Losses(learner), reference=Losses(reference),
                     options=SelectOptions(n_chunks=16), seed=seed).indices
        counts[idx] += 1
    assert _max_z(counts, probs, runs) < 4.0


def test_inclusion_test_rejects_a_wrong_sampler(per_example_case):
    """The same statistical test fails for sampling proportional to the score, not exp(score)."""
    learner, reference, probs = per_example_case
    runs = 4000
    counts = np.zeros(8)
    weights = np.clip(learner - reference, 1e-3, None)
    for seed in range(runs):
        counts[np.random.default_rng(seed).choice(8, 3, replace=False, p=weights / weights.sum())] += 1
    assert _max_z(counts, probs, runs) > 4.0


def test_topk_returns_exactly_the_b_largest():
    rng = np.random.default_rng(1)
    learner, reference = rng.normal(size=500), rng.normal(size=500)
    idx = select(37, kind="per_example", learner=Losses(learner), reference=Losses(reference),
                 options=SelectOptions(sampler="topk")).indices
    assert sorted(idx.tolist()) == sorted(np.argsort(reference - learner)[:37].tolist())
    assert len(set(idx.tolist())) == 37


def test_topk_is_the_high_gain_limit_of_joint_on_per_example_scores():
    rng = np.random.default_rng(2)
    learner = Losses(rng.normal(size=300))
    reference = Losses(rng.normal(size=300))
    greedy = select(30, kind="per_example", learner=learner, reference=reference, options=SelectOptions(sampler="topk")).indices
    sampled = select(30, kind="per_example", learner=learner, reference=reference, options=SelectOptions(score_gain=1e4), seed=3).indices
    assert set(greedy.tolist()) == set(sampled.tolist())


# 4. Incremental == full-matrix, same seed ---------------------------------------------------

def share(n_select, n_selected, batch):
    """rho: the chance that another unselected example is in a random completion of S."""
    return max(n_select - n_selected - 1, 0) / (batch - n_selected - 1)


def full_matrix_sigmoid_joint(learner, reference, n_select, n_chunks, seed, gain=1.0, lookahead=True):
    """c_i = S_ii + sum_{k in S} (S_ik + S_ki), and with lookahead + rho * sum over the
    other unselected k of (S_ik + S_ki), from the full matrix S."""
    s = sigmoid_matrix(learner, reference)
    batch = s.shape[0]
    rng = np.random.default_rng(seed)
    taken = np.zeros(batch, dtype=bool)
    out = []
    for size in chunk_sizes(n_select, n_chunks):
        rho = share(n_select, len(out), batch) if lookahead else 0.0
        c = np.array([s[i, i] + sum(s[i, k] + s[k, i] for k in out)
                      + rho * sum(s[i, k] + s[k, i] for k in range(batch) if k != i and not taken[k])
                      for i in range(batch)])
        pick = gumbel_topk(gain * c, size, rng, taken)
        taken[pick] = True
        out.extend(pick.tolist())
    return np.array(out)


def full_matrix_softmax_joint(learner, reference, n_select, n_chunks, seed, gain=1.0, lookahead=True):
    """CLIP's own-loss score of candidate i: its image->text and text->image cross-entropy
    over S + {i}, every other example weighted rho (lookahead) or 0; given the empty set
    without lookahead, over the whole super-batch."""
    def own_losses(m, selected, rho):
        x = m.logit_scale * (m.image.astype(np.float64) @ m.text.T.astype(np.float64))
        n = x.shape[0]
        losses = np.empty(n)
        for i in range(n):
            w = np.full(n, 1.0 if not selected and not lookahead else rho)
            w[selected + [i]] = 1.0
            with np.errstate(divide="ignore"):
                logw = np.log(w)
            losses[i] = 0.5 * (np.logaddexp.reduce(x[i] + logw) - x[i, i]) + \
                0.5 * (np.logaddexp.reduce(x[:, i] + logw) - x[i, i])
        return losses

    rng = np.random.default_rng(seed)
    batch = learner.image.shape[0]
    taken = np.zeros(batch, dtype=bool)
    out: list[int] = []
    for size in chunk_sizes(n_select, n_chunks):
        rho = share(n_select, len(out), batch) if lookahead else 0.0
        c = own_losses(learner, out, rho) - own_losses(reference, out, rho)
        pick = gumbel_topk(gain * c, size, rng, taken)
        taken[pick] = True
        out.extend(pick.tolist())
    return np.array(out)


@pytest.mark.parametrize("lookahead", ["in_batch", "none"])
@pytest.mark.parametrize("kind,reference_impl", [
    ("sigmoid_contrastive", full_matrix_sigmoid_joint),
    ("softmax_contrastive", full_matrix_softmax_joint),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_joint_equals_full_matrix(kind, reference_impl, seed, lookahead):
    learner, reference = make_pair(seed, batch=48, dim=8)
    ours = select(13, kind=kind, learner=learner, reference=reference, seed=seed,
                  options=SelectOptions(n_chunks=4, score_gain=2.0, softmax_score="own",
                                        lookahead=lookahead)).indices
    theirs = reference_impl(learner, reference, 13, 4, seed, gain=2.0, lookahead=lookahead == "in_batch")
    assert ours.tolist() == theirs.tolist()


def test_sigmoid_topk_ranks_by_the_whole_in_batch_loss():
    """topk's sigmoid score is S_ii + sum_{j != i} (S_ij + S_ji), not the positive pair alone."""
    learner, reference = make_pair(3, batch=64, dim=8)
    s = sigmoid_matrix(learner, reference)
    want = np.diag(s) + (s.sum(axis=0) + s.sum(axis=1) - 2 * np.diag(s))
    got = select(20, kind="sigmoid_contrastive", learner=learner, reference=reference,
                 options=SelectOptions(sampler="topk")).indices
    assert sorted(got.tolist()) == sorted(np.argsort(-want)[:20].tolist())


def test_chunk_sizes_spread_the_remainder():
    assert chunk_sizes(50, 16) == [4] * 2 + [3] * 14
    assert chunk_sizes(26, 16) == [2] * 10 + [1] * 6  # not 15 chunks of 1 and one of 11
    assert chunk_sizes(5, 16) == [1] * 5
    assert sum(chunk_sizes(819, 16)) == 819


def test_softplus_colsum_is_exact_including_large_logits():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 3000)) * 30).astype(np.float32)
    for shift in (0.0, -5.0, 7.0):
        expected = np.logaddexp(0.0, x.astype(np.float64) + shift).sum(axis=0)
        got = softplus_colsum(x.copy(), shift)
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-4)


def test_same_seed_same_indices_different_seed_different_indices():
    learner, reference = make_pair(1)
    a = select(51, kind="sigmoid_contrastive", learner=learner, reference=reference, seed=9).indices
    b = select(51, kind="sigmoid_contrastive", learner=learner, reference=reference, seed=9).indices
    c = select(51, kind="sigmoid_contrastive", learner=learner, reference=reference, seed=10).indices
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 51


@pytest.mark.parametrize("score", ["hard_learner", "easy_reference"])
def test_single_model_rules_need_only_that_model(score):
    learner, reference = make_pair(2)
    kwargs = {"learner": learner, "reference": None} if score == "hard_learner" else \
        {"learner": None, "reference": reference}
    idx = select(20, kind="sigmoid_contrastive", options=SelectOptions(score=score), seed=0, **kwargs).indices
    assert len(set(idx.tolist())) == 20


def test_per_example_joint_is_one_plackett_luce_draw_of_b():
    """Per-example scores never change between chunks, so the N chunked draws are one
    Gumbel-top-b draw (the same distribution; the frequency test above checks it)."""
    rng = np.random.default_rng(5)
    learner, reference = rng.normal(size=400), rng.normal(size=400)
    got = select(60, kind="per_example", learner=Losses(learner), reference=Losses(reference),
                 options=SelectOptions(n_chunks=16, score_gain=3.0), seed=11).indices
    want = gumbel_topk(3.0 * (learner - reference), 60, np.random.default_rng(11))
    assert got.tolist() == want.tolist()


# 5. Lookahead at the edges: every slot left, none left, tiny batches, one model ----------

@pytest.mark.parametrize("kind", ["sigmoid_contrastive", "softmax_contrastive"])
@pytest.mark.parametrize("lookahead", ["in_batch", "none"])
@pytest.mark.parametrize("batch,n_select", [(2, 1), (2, 2), (3, 2), (17, 16), (17, 17), (40, 1)])
def test_joint_edges_give_distinct_valid_indices(kind, lookahead, batch, n_select):
    """b = B (rho = 1: the members' term must vanish, not turn into -inf), b = B - 1 (the
    last chunk's rho is 0) and b = 1 select b distinct indices, the same twice."""
    learner, reference = make_pair(5, batch=batch, dim=4)
    options = SelectOptions(n_chunks=16, lookahead=lookahead)
    got = select(n_select, kind=kind, learner=learner, reference=reference, options=options, seed=3)
    again = select(n_select, kind=kind, learner=learner, reference=reference, options=options, seed=3)
    idx = got.indices.tolist()
    assert len(idx) == n_select == len(set(idx)) and all(0 <= i < batch for i in idx)
    assert idx == again.indices.tolist() and np.isfinite(got.mean_score)


@pytest.mark.parametrize("kind", ["sigmoid_contrastive", "softmax_contrastive"])
@pytest.mark.parametrize("score", ["hard_learner", "easy_reference"])
def test_lookahead_with_one_model(kind, score):
    learner, reference = make_pair(6, batch=64, dim=8)
    got = select(12, kind=kind, learner=learner, reference=reference,
                 options=SelectOptions(score=score), seed=1).indices
    assert len(set(got.tolist())) == 12


def test_softmax_lookahead_survives_a_sharp_logit_scale():
    """Logit scale 100 on float32 embeddings: the rest of a row's exp-sum is taken as
    e^{R_batch} - e^{R_set} - e^{x_ii} in log space and must not cancel into NaN."""
    learner, reference = make_pair(7, batch=96, dim=8, scale=100.0, bias=0.0)
    got = select(24, kind="softmax_contrastive", learner=learner, reference=reference, seed=2)
    assert len(set(got.indices.tolist())) == 24 and np.isfinite(got.mean_score)
