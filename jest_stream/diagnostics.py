"""Loss diagnostics of one super-batch: is the reference still ahead of the learner?

Learnability selection (learner loss - reference loss) only helps while the reference
knows better than the learner. When the reference's loss is above the learner's on most
examples (a weak reference, or a learner that has overtaken it), the score mostly
ranks by what the learner already knows. ``loss_summary`` gives the figures the loader
watches: each model's mean per-example loss over the super-batch and the share of
examples on which the reference's loss is the higher.

Per-example losses: those losses, over all B. Contrastive kinds: each example's
in-batch loss as the loss defines it (sigmoid: its positive pair plus its row and
column of negatives; softmax: the mean of its image->text and text->image
cross-entropies over the whole super-batch), the score the core's ``topk`` ranks
by for one model alone, estimated on at most ``rows`` evenly
spaced examples (super-batches arrive shuffled), so the cost is bounded by
O(rows * B * d) per model whatever B is; exact when B <= rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jest_stream.conditional import softplus_colsum
from jest_stream.outputs import Embeddings, Losses
from jest_stream.xp import to_host

DIAGNOSTIC_ROWS = 128


@dataclass(frozen=True)
class LossSummary:
    """Mean per-example losses of the learner and the reference (NaN: that model was not
    scored) and the share of examples whose reference loss exceeds the learner's (NaN
    unless both were)."""

    mean_learner_loss: float = math.nan
    mean_reference_loss: float = math.nan
    reference_above_learner: float = math.nan

    def as_fields(self) -> dict[str, float]:
        return {"mean_learner_loss": self.mean_learner_loss,
                "mean_reference_loss": self.mean_reference_loss,
                "reference_above_learner": self.reference_above_learner}


def _logsumexp_cols(x: np.ndarray) -> np.ndarray:
    """Column-wise log-sum-exp of a float32 (B, m) array, in float64; overwrites ``x``."""
    m = x.max(axis=0)
    x -= m
    np.exp(x, out=x)
    return np.log(x.sum(axis=0, dtype=np.float64)) + m.astype(np.float64)


def in_batch_losses(emb: Embeddings, rows: np.ndarray, kind: str) -> np.ndarray:
    """The in-batch loss of each example in ``rows`` against the whole super-batch (float64)."""
    zi = to_host(emb.image).astype(np.float32) * np.float32(emb.logit_scale)
    zt = to_host(emb.text).astype(np.float32)
    # Laid out (B, m) so that each sampled example's sums are column sums.
    own = zt @ zi[rows].T    # [j, k] = x[k, j]: image k against every text j
    other = zi @ zt[rows].T  # [j, k] = x[j, k]: every image j against text k
    pos = np.einsum("ij,ij->i", zi[rows], zt[rows]).astype(np.float64)
    if kind == "sigmoid_contrastive":
        bias = float(emb.logit_bias)
        pos += bias
        # The sums run over j = k too, as a negative: take that term out of both.
        negatives = softplus_colsum(own, bias) + softplus_colsum(other, bias) - 2.0 * np.logaddexp(0.0, pos)
        return np.logaddexp(0.0, -pos) + negatives
    return 0.5 * ((_logsumexp_cols(own) - pos) + (_logsumexp_cols(other) - pos))


def sample_rows(batch: int, rows: int = DIAGNOSTIC_ROWS) -> np.ndarray:
    """At most ``rows`` evenly spaced indices of a batch of ``batch`` (all of them if it is smaller)."""
    if batch <= rows:
        return np.arange(batch)
    return np.unique(np.linspace(0, batch - 1, rows).round().astype(np.int64))


def _losses(kind: str, outputs: Losses | Embeddings | None, rows: np.ndarray | None) -> np.ndarray | None:
    if outputs is None:
        return None
    if kind == "per_example":
        return to_host(outputs.values).astype(np.float64).reshape(-1)
    return in_batch_losses(outputs, rows, kind)


def loss_summary(kind: str, learner: Losses | Embeddings | None, reference: Losses | Embeddings | None,
                 rows: int = DIAGNOSTIC_ROWS) -> LossSummary:
    """The super-batch's LossSummary from the outputs a selection used (either may be None)."""
    present = learner if learner is not None else reference
    if present is None:
        return LossSummary()
    sample = None if kind == "per_example" else sample_rows(present.batch_size, rows)
    ours, theirs = _losses(kind, learner, sample), _losses(kind, reference, sample)
    above = math.nan
    if ours is not None and theirs is not None:
        above = float(np.mean(theirs > ours))
    return LossSummary(math.nan if ours is None else float(ours.mean()),
                       math.nan if theirs is None else float(theirs.mean()), above)
