"""Conditional scores: how much an unselected candidate adds to an already-selected set.

JEST's joint sampler needs, at every chunk, the score of each candidate i given the
set S selected so far. Each loss kind gets one small class that keeps that score as
a running vector and updates it from the newest chunk:

- ``PerExampleScores``: c_i = s_i (scores add up, so nothing changes between chunks).
- ``SigmoidScores``: c_i = S_ii + sum_{k in S} (S_ik + S_ki), with
  S_ij = sum_m w_m * nll_m(i, j) and nll(i, j) = -log sigmoid(y_ij * (a * zi_i . zt_j + b)).
  Only the rows and columns of S for the new chunk are computed, from the embeddings
  (B x |C| x d matmuls): O(B * b) work, O(B * |C|) memory, never a B x B matrix.
- ``SoftmaxScores`` (in ``softmax_scores``): CLIP's loss, which does not decompose
  into pairs.

Each class also gives ``per_example()``, the score ``topk`` ranks by: the example's
own loss in the context of the whole super-batch, as the loss defines it (sigmoid:
its positive pair plus its whole row and column of negatives), computed in row
blocks. ``diagonal()`` is the cheap score a set's mean is reported with.

The weights w_m come from the score rule (learnability = learner - reference). All
of it runs on numpy, torch or CuPy arrays alike (see ``jest_stream.xp``).
"""
from __future__ import annotations

from typing import Any

from jest_stream import xp as xp_util
from jest_stream.logits import softplus, softplus_colsum, softplus_sums, towers, weights
from jest_stream.options import SOFTMAX_SCORES, check_name
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

    def initial(self) -> Any:
        return self._s

    def expected(self, n_select: int) -> Any:
        return self._s

    def update(self, chunk: Any) -> Any:
        return self._s


class SigmoidScores:
    """SigLIP's pairwise sigmoid loss: S_ij = sum_m w_m * -log sigmoid(y_ij * x^m_ij)."""

    pairwise = True

    def __init__(self, learner: Embeddings | None, reference: Embeddings | None,
                 score: str = "learnability"):
        self._towers = towers(learner, reference, score, with_bias=True)
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

    def expected(self, n_select: int) -> Any:
        """E[c_i | S a uniform random set of n_select - 1 others]: S_ii plus that share
        of i's pairs with the whole super-batch (one B x B x d pass, as ``per_example``)."""
        share = (n_select - 1) / max(self.batch_size - 1, 1)
        return self._diag + share * (self.per_example() - self._diag)

    def initial(self) -> Any:
        xp = xp_util.namespace(self._diag)
        self._c = xp.asarray(self._diag, copy=True)
        return self._c

    def update(self, chunk: Any) -> Any:
        """c_i += sum_{k in chunk} (S_ik + S_ki) for every i (off-diagonal: y = -1)."""
        for w, t in self._towers:
            self._c += w * softplus_colsum(t.rows(chunk), t.bias, t.bound)
            self._c += w * softplus_colsum(t.cols(chunk), t.bias, t.bound)
        return self._c


ConditionalScores = PerExampleScores | SigmoidScores | SoftmaxScores


def conditional_scores(kind: str, learner: Any, reference: Any, score: str = "learnability",
                       softmax_score: str = "marginal") -> ConditionalScores:
    """The conditional-score tracker for loss ``kind`` (one of LOSS_KINDS); ``softmax_score``
    picks the softmax candidate score (``marginal`` or ``own``)."""
    kind = check_name(kind, LOSS_KINDS, "kind")
    if kind == "per_example":
        return PerExampleScores(learner, reference, score)
    if kind == "sigmoid_contrastive":
        return SigmoidScores(learner, reference, score)
    return SoftmaxScores(learner, reference, score, check_name(softmax_score, SOFTMAX_SCORES, "softmax_score"))
