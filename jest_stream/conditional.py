"""Conditional scores: how much an unselected candidate adds to an already-selected set.

JEST's joint sampler needs, at every chunk, the score of each candidate i given the
set S selected so far. Each loss kind gets one small class that keeps that score as
a running vector and updates it from the newest chunk only:

- ``PerExampleScores``: c_i = s_i (scores add up, so nothing changes between chunks).
- ``SigmoidScores``: c_i = S_ii + sum_{k in S} (S_ik + S_ki), with
  S_ij = sum_m w_m * nll_m(i, j) and nll(i, j) = -log sigmoid(y_ij * (a * zi_i . zt_j + b)).
  Only the rows and columns of S for the new chunk are computed, from the embeddings
  (B x |C| x d matmuls): O(B * b) work, O(B * |C|) memory, never a B x B matrix.
- ``SoftmaxScores``: CLIP's loss does not decompose into pairs, so the candidate's own
  loss is recomputed against the selected set: ell_i(S) = mean of the image->text and
  text->image cross-entropies of i within S + {i}. Running log-sum-exps over S keep this
  O(B * |C| * d) per chunk. Given the empty set (the first chunk, and ``topk``) the
  context is the whole super-batch, computed in row blocks (no B x B allocation).

The weights w_m come from the score rule (learnability = learner - reference).
"""
from __future__ import annotations

import numpy as np

from jest_stream.options import SCORE_WEIGHTS, SCORES, check_name
from jest_stream.outputs import LOSS_KINDS, Embeddings, Losses

# softplus(x) = log(1 + e^x) is taken as x - L + softplus(L) above L (error < e^-L = 2e-9).
_SOFTPLUS_LINEAR = 20.0
# Factors (1 + e^x) <= 1 + e^L are multiplied in groups of 2**levels before one log:
# (1 + e^20)^4 < e^81 stays inside float32, and a quarter of the logs are left.
_GROUP_LEVELS = 2
_ROW_BLOCK = 4096


def softplus_colsum(x: np.ndarray, shift: float = 0.0, bound: float = np.inf) -> np.ndarray:
    """Column sums of softplus(x + shift) = -log sigmoid(-(x + shift)) for a (k, B)
    float32 array, exact to ~1e-7 relative; overwrites ``x``.

    Laid out (k, B) so that every pass runs over contiguous rows of length B. One
    thread on purpose: BLAS worker threads keep spinning right after each matmul, and
    splitting this pass across threads measured slower. ``bound``, an upper bound on
    ``x`` known beforehand, spares the pass that looks for logits past the linear limit.
    """
    limit = _SOFTPLUS_LINEAR - shift
    excess = None
    if bound > limit and float(x.max(initial=-np.inf)) > limit:
        excess = np.maximum(x - limit, 0.0).sum(axis=0, dtype=np.float64)
        np.minimum(x, limit, out=x)
    np.exp(x, out=x)
    if shift:
        x *= np.float32(np.exp(shift))
    x += 1.0
    k = x.shape[0]
    for _ in range(_GROUP_LEVELS):
        if k < 2:
            break
        half = k // 2
        x[:half] *= x[half:2 * half]
        if k % 2:  # the odd row out joins the next level unpaired
            x[half] = x[k - 1]
        k = half + k % 2
    head = x[:k]
    np.log(head, out=head)
    sums = head.sum(axis=0, dtype=np.float64)
    return sums if excess is None else sums + excess


def _weights(score: str) -> tuple[float, float]:
    return SCORE_WEIGHTS[check_name(score, SCORES, "score")]


class PerExampleScores:
    """Per-example losses: the joint learnability of a set is the sum of its members'."""

    pairwise = False  # c_i never changes: the joint sampler may draw all chunks at once

    def __init__(self, learner: Losses | None, reference: Losses | None, score: str = "learnability"):
        w_l, w_r = _weights(score)
        total = np.zeros(_batch(learner, reference), dtype=np.float64)
        for w, m in ((w_l, learner), (w_r, reference)):
            if w:
                total += w * m.values
        self._s = total

    @property
    def batch_size(self) -> int:
        return self._s.shape[0]

    def diagonal(self) -> np.ndarray:
        """Each example's own score s_i."""
        return self._s

    def initial(self) -> np.ndarray:
        return self._s.copy()

    def update(self, chunk: np.ndarray) -> np.ndarray:
        return self._s


class _Tower:
    """One model's contrastive embeddings, with the logit scale folded in once."""

    def __init__(self, emb: Embeddings, with_bias: bool):
        self.scale = emb.logit_scale
        self.bias = emb.logit_bias if with_bias else 0.0
        self.zi = emb.image * np.float32(self.scale)
        self.zt = emb.text
        # Positive-pair logits x_ii = a * zi_i . zt_i + b (float32 dot products, as the
        # off-diagonal logits are).
        self.diag = np.einsum("ij,ij->i", self.zi, self.zt).astype(np.float64) + self.bias
        # Cauchy-Schwarz: every logit a * zi_i . zt_k is at most max|a zi| * max|zt|
        # (with a margin for float32 rounding), so most batches never need the max pass.
        self.bound = (1.0 + 1e-3) * _max_norm(self.zi) * _max_norm(self.zt)

    def rows(self, chunk: np.ndarray) -> np.ndarray:
        """x[i, k] - b = a * zi_i . zt_k for every i and each k in chunk, as (|C|, B)."""
        return self.zt[chunk] @ self.zi.T

    def cols(self, chunk: np.ndarray) -> np.ndarray:
        """x[k, i] - b = a * zi_k . zt_i for every i and each k in chunk, as (|C|, B)."""
        return self.zi[chunk] @ self.zt.T


def _max_norm(z: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", z, z).max(initial=0.0)))


def _towers(learner: Embeddings | None, reference: Embeddings | None, score: str, with_bias: bool):
    w_l, w_r = _weights(score)
    return [(w, _Tower(m, with_bias)) for w, m in ((w_l, learner), (w_r, reference)) if w]


def _batch(learner, reference) -> int:
    return (learner if learner is not None else reference).batch_size


class SigmoidScores:
    """SigLIP's pairwise sigmoid loss: S_ij = sum_m w_m * -log sigmoid(y_ij * x^m_ij)."""

    pairwise = True

    def __init__(self, learner: Embeddings | None, reference: Embeddings | None,
                 score: str = "learnability"):
        self._towers = _towers(learner, reference, score, with_bias=True)
        diag = np.zeros(_batch(learner, reference), dtype=np.float64)
        for w, t in self._towers:
            # y_ii = +1: -log sigmoid(x) = softplus(-x).
            diag += w * np.logaddexp(0.0, -t.diag)
        self._diag = diag
        self._c: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return self._diag.shape[0]

    def diagonal(self) -> np.ndarray:
        """S_ii: each example's score on its own (positive) pair."""
        return self._diag

    def initial(self) -> np.ndarray:
        self._c = self._diag.copy()
        return self._c

    def update(self, chunk: np.ndarray) -> np.ndarray:
        """c_i += sum_{k in chunk} (S_ik + S_ki) for every i (off-diagonal: y = -1)."""
        for w, t in self._towers:
            self._c += w * softplus_colsum(t.rows(chunk), t.bias, t.bound)
            self._c += w * softplus_colsum(t.cols(chunk), t.bias, t.bound)
        return self._c


def _logsumexp_cols(x: np.ndarray) -> np.ndarray:
    """Column-wise log-sum-exp of a (k, B) array, stable, in float64; overwrites ``x``."""
    m = x.max(axis=0, keepdims=True)
    m[~np.isfinite(m)] = 0.0  # a column of -inf only (empty context) sums to -inf, not NaN
    np.subtract(x, m, out=x)
    np.exp(x, out=x)
    with np.errstate(divide="ignore"):
        return np.log(x.sum(axis=0, dtype=np.float64)) + m[0].astype(np.float64)


class SoftmaxScores:
    """CLIP's softmax loss, conditioned on the selected set (see module docstring)."""

    pairwise = True

    def __init__(self, learner: Embeddings | None, reference: Embeddings | None,
                 score: str = "learnability"):
        self._towers = _towers(learner, reference, score, with_bias=False)
        self._b = _batch(learner, reference)
        self._lse_rows: list[np.ndarray] | None = None
        self._lse_cols: list[np.ndarray] | None = None
        self._diag: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return self._b

    def _own_loss(self, lse_rows: list[np.ndarray], lse_cols: list[np.ndarray]) -> np.ndarray:
        c = np.zeros(self._b, dtype=np.float64)
        for (w, t), lr, lc in zip(self._towers, lse_rows, lse_cols):
            # Candidate i's logits over S + {i}: its positive x_ii joins the context.
            i2t = np.logaddexp(lr, t.diag) - t.diag
            t2i = np.logaddexp(lc, t.diag) - t.diag
            c += w * 0.5 * (i2t + t2i)
        return c

    def diagonal(self) -> np.ndarray:
        """Each example's loss score against the whole super-batch (its in-batch score)."""
        if self._diag is None:
            rows, cols = [], []
            everyone = np.arange(self._b)
            for _, t in self._towers:
                lr = np.empty(self._b)
                lc = np.empty(self._b)
                for start in range(0, self._b, _ROW_BLOCK):
                    block = everyone[start:start + _ROW_BLOCK]
                    # Context = all others; x_ii is added back by _own_loss, so mask it out.
                    xr = t.rows(block)  # (|block|, B): x[i, k] at [k - start, i]
                    xc = t.cols(block)
                    idx = block - start
                    xr[idx, block] = -np.inf
                    xc[idx, block] = -np.inf
                    lr_block = _logsumexp_cols(xr)
                    lc_block = _logsumexp_cols(xc)
                    lr = lr_block if start == 0 else np.logaddexp(lr, lr_block)
                    lc = lc_block if start == 0 else np.logaddexp(lc, lc_block)
                rows.append(lr)
                cols.append(lc)
            self._diag = self._own_loss(rows, cols)
        return self._diag

    def initial(self) -> np.ndarray:
        self._lse_rows = [np.full(self._b, -np.inf) for _ in self._towers]
        self._lse_cols = [np.full(self._b, -np.inf) for _ in self._towers]
        return self.diagonal().copy()

    def update(self, chunk: np.ndarray) -> np.ndarray:
        """Fold the new chunk into each candidate's running log-sum-exps; return ell_i(S)."""
        for m, (_, t) in enumerate(self._towers):
            self._lse_rows[m] = np.logaddexp(self._lse_rows[m], _logsumexp_cols(t.rows(chunk)))
            self._lse_cols[m] = np.logaddexp(self._lse_cols[m], _logsumexp_cols(t.cols(chunk)))
        return self._own_loss(self._lse_rows, self._lse_cols)


ConditionalScores = PerExampleScores | SigmoidScores | SoftmaxScores

_BY_KIND = {
    "per_example": PerExampleScores,
    "sigmoid_contrastive": SigmoidScores,
    "softmax_contrastive": SoftmaxScores,
}


def conditional_scores(kind: str, learner, reference, score: str = "learnability") -> ConditionalScores:
    """The conditional-score tracker for loss ``kind`` (one of LOSS_KINDS)."""
    return _BY_KIND[check_name(kind, LOSS_KINDS, "kind")](learner, reference, score)
