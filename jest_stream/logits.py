"""Contrastive logits a block of rows at a time, and the reductions the scores need.

The conditional scores never hold a B x B matrix: they ask one model's ``Tower`` for
the (rows x B) logits of a chunk, a block or the selected set, and reduce them at
once (column sums of softplus, log-sum-exps) in float64. Written against the array
API, so numpy, torch and CuPy arrays take the same path.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from jest_stream import xp as xp_util
from jest_stream.options import SCORE_WEIGHTS, SCORES, check_name
from jest_stream.outputs import Embeddings

# softplus(x) = log(1 + e^x) is taken as x - L + softplus(L) above L (error < e^-L = 2e-9).
_SOFTPLUS_LINEAR = 20.0
# Factors (1 + e^x) <= 1 + e^L are multiplied in groups of 2**levels before one log:
# (1 + e^20)^4 < e^81 stays inside float32, and a quarter of the logs are left.
_GROUP_LEVELS = 2


def _clip_excess(x: Any, limit: float, bound: float, axes: tuple[int, ...]) -> list[Any] | None:
    """Sums over ``axes`` of max(x - limit, 0), then x clipped to ``limit`` in place;
    None where no entry passes ``limit`` (``bound``, known beforehand, spares the look)."""
    xp = xp_util.namespace(x)
    if not (bound > limit and float(xp.max(x)) > limit):
        return None
    over = xp.clip(x - limit, min=0.0)
    sums = [xp_util.sum64(over, a) for a in axes]
    xp_util.clip_max_(x, limit)
    return sums


def softplus_colsum(x: Any, shift: float = 0.0, bound: float = np.inf) -> Any:
    """Column sums of softplus(x + shift) = -log sigmoid(-(x + shift)) for a (k, B)
    float array, exact to ~1e-7 relative, in float64; overwrites ``x``.

    Laid out (k, B) so that every pass runs over contiguous rows of length B. One
    thread on purpose (numpy): BLAS worker threads keep spinning right after each
    matmul, and splitting this pass across threads measured slower. ``bound``, an
    upper bound on ``x`` known beforehand, spares the pass that looks for logits past
    the linear limit.
    """
    xp = xp_util.namespace(x)
    excess = _clip_excess(x, _SOFTPLUS_LINEAR - shift, bound, (0,))
    xp_util.exp_(x)
    if shift:
        x *= float(np.float32(np.exp(shift)))
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
    xp_util.log_(head)
    sums = xp_util.sum64(head, 0)
    return sums if excess is None else sums + excess[0]


def softplus_sums(x: Any, shift: float = 0.0, bound: float = np.inf) -> tuple[Any, Any]:
    """Row and column sums (float64) of softplus(x + shift) for a (k, B) array; overwrites ``x``."""
    xp = xp_util.namespace(x)
    excess = _clip_excess(x, _SOFTPLUS_LINEAR - shift, bound, (1, 0))
    xp_util.exp_(x)
    if shift:
        x *= float(np.float32(np.exp(shift)))
    x += 1.0
    xp_util.log_(x)
    rows = xp_util.sum64(x, 1)
    cols = xp_util.sum64(x, 0)
    if excess is not None:
        rows, cols = rows + excess[0], cols + excess[1]
    return rows, cols


def logsumexp(x: Any, axis: int) -> Any:
    """Log-sum-exp of a 2-D array along ``axis``, stable, in float64; overwrites ``x``."""
    xp = xp_util.namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))  # an all -inf line sums to -inf, not NaN
    x -= m
    xp_util.exp_(x)
    with np.errstate(divide="ignore"):
        total = xp.log(xp_util.sum64(x, axis))
    return total + xp.astype(xp.reshape(m, (-1,)), xp.float64)


def completion_share(n_select: int, n_selected: int, batch: int) -> float:
    """The chance that a given other unselected example joins a candidate in a uniformly
    random completion of the selected set to ``n_select``: (b - |S| - 1) / (B - |S| - 1),
    0 when no slot is left. The contrastive scores' lookahead weighs the rest of the
    super-batch by it."""
    pool = batch - n_selected - 1
    return max(n_select - n_selected - 1, 0) / pool if pool > 0 else 0.0


def softplus(v: Any) -> Any:
    """log(1 + e^v), elementwise and stable."""
    xp = xp_util.namespace(v)
    return xp.logaddexp(xp.zeros_like(v), v)


def weights(score: str) -> tuple[float, float]:
    """(learner, reference) weights of score rule ``score``."""
    return SCORE_WEIGHTS[check_name(score, SCORES, "score")]


class Tower:
    """One model's contrastive embeddings, with the logit scale folded in once."""

    def __init__(self, emb: Embeddings, with_bias: bool):
        xp = xp_util.namespace(emb.image)
        self.xp = xp
        self.scale = emb.logit_scale
        self.bias = emb.logit_bias if with_bias else 0.0
        self.zi = emb.image * float(np.asarray(self.scale, dtype=np.float32)) \
            if emb.image.dtype == xp.float32 else emb.image * self.scale
        self.zt = emb.text
        self.batch = int(self.zi.shape[0])
        # Positive-pair logits x_ii = a * zi_i . zt_i + b (in the embeddings' precision,
        # as the off-diagonal logits are), kept in float64.
        self.diag = xp.astype(xp_util.rowdot(self.zi, self.zt), xp.float64) + self.bias
        # Cauchy-Schwarz: every logit a * zi_i . zt_k is at most max|a zi| * max|zt|
        # (with a margin for float32 rounding), so most batches never need the max pass.
        self.bound = (1.0 + 1e-3) * _max_norm(self.zi) * _max_norm(self.zt)

    def rows(self, chunk: Any) -> Any:
        """x[i, k] - b = a * zi_i . zt_k for every i and each k in chunk, as (|C|, B)."""
        return self.xp.take(self.zt, chunk, axis=0) @ self.zi.T

    def cols(self, chunk: Any) -> Any:
        """x[k, i] - b = a * zi_k . zt_i for every i and each k in chunk, as (|C|, B)."""
        return self.xp.take(self.zi, chunk, axis=0) @ self.zt.T

    def block(self, start: int, stop: int) -> Any:
        """x[i, j] - b for i in [start, stop) and every j, as (stop - start, B)."""
        return self.zi[start:stop] @ self.zt.T

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Row ranges [start, stop) covering the batch within the device's block budget."""
        step = xp_util.block_rows(self.zi, self.batch)
        for start in range(0, self.batch, step):
            yield start, min(start + step, self.batch)


def _max_norm(z: Any) -> float:
    xp = xp_util.namespace(z)
    return float(xp.sqrt(xp.max(xp_util.rowdot(z, z)))) if z.shape[0] else 0.0


def towers(learner: Embeddings | None, reference: Embeddings | None, score: str,
           with_bias: bool) -> list[tuple[float, Tower]]:
    """(weight, Tower) for each model the score rule uses."""
    w_l, w_r = weights(score)
    return [(w, Tower(m, with_bias)) for w, m in ((w_l, learner), (w_r, reference)) if w]
