"""Conditional scores: how much an unselected candidate adds to an already-selected set.

JEST's joint sampler needs, at every chunk, the score of each candidate i given the
set S selected so far. Each loss kind gets one small class that keeps that score as
a running vector and updates it from the newest chunk:

- ``PerExampleScores``: c_i = s_i (scores add up, so nothing changes between chunks).
- ``SigmoidScores``: c_i = S_ii + sum_{k in S} (S_ik + S_ki), with
  S_ij = sum_m w_m * nll_m(i, j) and nll(i, j) = -log sigmoid(y_ij * (a * zi_i . zt_j + b)).
  Only the rows and columns of S for the new chunk are computed, from the embeddings
  (B x |C| x d matmuls): O(B * b) work, O(B * |C|) memory, never a B x B matrix.
  With lookahead (the default) c_i also counts rho * sum_{k not in S, k != i}
  (S_ik + S_ki): i's expected pairs with a uniformly random completion of S to b,
  rho = (b - |S| - 1) / (B - |S| - 1), from one in-batch pass (``per_example``).
- ``SoftmaxScores`` (in ``softmax_scores``): CLIP's loss, which does not decompose
  into pairs.

Each class also gives ``per_example()``, the score ``topk`` ranks by: the example's
own loss in the context of the whole super-batch, as the loss defines it (sigmoid:
its positive pair plus its whole row and column of negatives), computed in row
blocks. ``diagonal()`` is the cheap score a set's mean is reported with.

The weights w_m come from the score rule (learnability = learner - reference). All
of it runs on numpy, torch or CuPy arrays alike (see ``jest_stream.xp``).

Why the lookahead: JEST's first chunk draws from S_ii alone, which says nothing about
the hard negatives an example has in the batch, and every later chunk mostly completes
whatever clusters the first chunk happened to hit. On the quality tests' harness
(clusters of learnable hard negatives; mean batch learnability J of 20 seeds, gain 1),
J without / with lookahead, against in-batch topk and a long swap chain:
B=256: f=0.5 18.2 / 20.7 (topk 20.7, chain 20.9), f=0.8 17.9 / 22.7 (18.9, 22.7),
f=0.9 16.8 / 21.8 (13.1, 21.3); B=1024: f=0.5 22.6 / 25.5 (25.2, 24.7), f=0.8
24.6 / 30.7 (28.9, 28.7), f=0.9 25.1 / 34.7 (27.5, 30.7).
"""
from __future__ import annotations

from typing import Any

from jest_stream import xp as xp_util
from jest_stream.logits import completion_share, softplus, softplus_colsum, softplus_sums, towers, weights
from jest_stream.options import LOOKAHEADS, SOFTMAX_SCORES, check_name
from jest_stream.outputs import LOSS_KINDS, Embeddings, Losses
from jest_stream.softmax_scores import SoftmaxScores

# Re-exported: the benchmarks and tests reach the reductions through this module.
__all__ = ["ConditionalScores", "PerExampleScores", "SigmoidScores", "SoftmaxScores",
           "conditional_scores", "softplus_colsum"]


def _batch(learner: Any, reference: Any) -> int:
    return (learner if learner is not None else reference).batch_size


class PerExampleScores:
    """Per-example losses: the joint learnability of a set is the sum of its members'."""

    pairwise = False  # c_i never changes: the joint sampler may draw all chunks at once

    def __init__(self, learner: Losses | None, reference: Losses | None, score: str = "learnability"):
        w_l, w_r = weights(score)
        total = None
        for w, m in ((w_l, learner), (w_r, reference)):
            if w:
                total = w * m.values if total is None else total + w * m.values
        self._s = total

    @property
    def batch_size(self) -> int:
        return int(self._s.shape[0])

    def diagonal(self) -> Any:
        """Each example's own score s_i."""
        return self._s

    def per_example(self) -> Any:
        """The score ``topk`` ranks by: s_i."""
        return self._s

    def initial(self, n_select: int) -> Any:
        return self._s

    def update(self, chunk: Any) -> Any:
        return self._s


class SigmoidScores:
    """SigLIP's pairwise sigmoid loss: S_ij = sum_m w_m * -log sigmoid(y_ij * x^m_ij)."""

    pairwise = True

    def __init__(self, learner: Embeddings | None, reference: Embeddings | None,
                 score: str = "learnability", lookahead: str = "in_batch"):
        self._towers = towers(learner, reference, score, with_bias=True)
        self._lookahead = lookahead == "in_batch"
        self._n_select = self._n = 0
        self._pairs: Any = None
        diag = None
        for w, t in self._towers:
            # y_ii = +1: -log sigmoid(x) = softplus(-x).
            term = w * softplus(-t.diag)
            diag = term if diag is None else diag + term
        self._diag = diag
        self._c: Any = None

    @property
    def batch_size(self) -> int:
        return int(self._diag.shape[0])

    def diagonal(self) -> Any:
        """S_ii: each example's score on its own (positive) pair."""
        return self._diag

    def per_example(self) -> Any:
        """S_ii + sum_{j != i} (S_ij + S_ji): the example's share of the super-batch's
        SigLIP loss, its positive pair and its row and column of negatives. One B x B x d
        pass per model in row blocks; each block gives its rows' sums and adds to every
        column's."""
        total = None
        for w, t in self._towers:
            xp = t.xp
            rows = xp.zeros(t.batch, dtype=xp.float64, device=xp_util.device_of(t.diag))
            cols = xp.zeros_like(rows)
            for start, stop in t.blocks():
                r, c = softplus_sums(t.block(start, stop), t.bias, t.bound)
                rows[start:stop] = r
                cols += c
            # The sums ran over j = i too, as a negative: take that term out twice.
            term = w * (softplus(-t.diag) + rows + cols - 2.0 * softplus(t.diag))
            total = term if total is None else total + term
        return total

    def initial(self, n_select: int) -> Any:
        """The first chunk's scores (S empty), for a sub-batch of ``n_select``."""
        xp = xp_util.namespace(self._diag)
        self._n_select, self._n = n_select, 0
        self._c = xp.asarray(self._diag, copy=True)
        if self._lookahead:
            # Sum_{j != i} (S_ij + S_ji): i's pairs with the whole super-batch.
            self._pairs = self.per_example() - self._diag
        return self._scores()

    def update(self, chunk: Any) -> Any:
        """c_i += sum_{k in chunk} (S_ik + S_ki) for every i (off-diagonal: y = -1)."""
        for w, t in self._towers:
            self._c += w * softplus_colsum(t.rows(chunk), t.bias, t.bound)
            self._c += w * softplus_colsum(t.cols(chunk), t.bias, t.bound)
        self._n += int(chunk.shape[0])
        return self._scores()

    def _scores(self) -> Any:
        """c_i, plus with lookahead i's expected pairs with a uniformly random completion
        of S: the share rho of its pairs outside S, rho = (slots left) / (candidates left)."""
        if not self._lookahead:
            return self._c
        rho = completion_share(self._n_select, self._n, self.batch_size)
        with_set = self._c - self._diag
        return self._c + rho * (self._pairs - with_set)


ConditionalScores = PerExampleScores | SigmoidScores | SoftmaxScores


def conditional_scores(kind: str, learner: Any, reference: Any, score: str = "learnability",
                       softmax_score: str = "marginal", lookahead: str = "in_batch") -> ConditionalScores:
    """The conditional-score tracker for loss ``kind`` (one of LOSS_KINDS); ``softmax_score``
    picks the softmax candidate score (``marginal`` or ``own``), ``lookahead`` whether the
    contrastive scores count the rest of the sub-batch (``in_batch``) or not (``none``)."""
    kind = check_name(kind, LOSS_KINDS, "kind")
    lookahead = check_name(lookahead, LOOKAHEADS, "lookahead")
    if kind == "per_example":
        return PerExampleScores(learner, reference, score)
    if kind == "sigmoid_contrastive":
        return SigmoidScores(learner, reference, score, lookahead)
    return SoftmaxScores(learner, reference, score,
                         check_name(softmax_score, SOFTMAX_SCORES, "softmax_score"), lookahead)
