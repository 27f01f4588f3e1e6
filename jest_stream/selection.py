"""select(): scores of one super-batch in, the indices of its sub-batch out.

The one entry point that the server, the embedded scorer and the benchmarks call,
so that local and remote selections are identical for the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jest_stream.conditional import conditional_scores
from jest_stream.samplers import DEFAULT_N_CHUNKS, SAMPLERS, joint, topk, uniform
from jest_stream.scores import LOSS_KINDS, SCORES, SCORE_WEIGHTS, Embeddings, Losses, check_name

SeedLike = int | np.random.Generator | None


@dataclass(frozen=True)
class Selection:
    """The chosen indices (in selection order) and the mean per-example score of the
    selected examples and of the whole super-batch (how much selection raised it)."""

    indices: np.ndarray
    mean_score: float
    mean_score_all: float


def make_rng(seed: SeedLike) -> np.random.Generator:
    """A numpy Generator from an int seed (or a Generator, passed through; None: fresh)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed: expected a non-negative integer, a numpy Generator or None, got {seed!r}")
    return np.random.default_rng(seed)


def _expected_type(kind: str):
    return Losses if kind == "per_example" else Embeddings


def _validated(kind: str, outputs, field: str, needed: bool):
    if not needed:
        return None
    if outputs is None:
        raise ValueError(f"{field}: required by this score rule, got None")
    cls = _expected_type(kind)
    if not isinstance(outputs, cls):
        raise ValueError(f"{field}: kind {kind!r} expects {cls.__name__}, got {type(outputs).__name__}")
    return outputs.validated(field)


def select(
    n_select: int,
    *,
    kind: str,
    learner: Losses | Embeddings | None,
    reference: Losses | Embeddings | None,
    score: str = "learnability",
    sampler: str = "joint",
    n_chunks: int = DEFAULT_N_CHUNKS,
    score_gain: float = 1.0,
    seed: SeedLike = None,
) -> Selection:
    """Select ``n_select`` examples of a super-batch from learner and reference outputs.

    ``kind`` is the loss kind (per_example, sigmoid_contrastive, softmax_contrastive);
    ``score`` the rule (learnability, hard_learner, easy_reference); ``sampler`` one of
    joint, topk, uniform. Raises ValueError naming the argument on bad input.
    """
    check_name(kind, LOSS_KINDS, "kind")
    check_name(score, SCORES, "score")
    check_name(sampler, SAMPLERS, "sampler")
    if not np.isfinite(score_gain):
        raise ValueError(f"score_gain: must be finite, got {score_gain}")
    w_learner, w_reference = SCORE_WEIGHTS[score]
    learner = _validated(kind, learner, "learner", bool(w_learner))
    reference = _validated(kind, reference, "reference", bool(w_reference))
    if learner is not None and reference is not None:
        if learner.batch_size != reference.batch_size:
            raise ValueError(
                f"reference: {reference.batch_size} examples but learner has {learner.batch_size}; "
                "both must score the same super-batch"
            )
    rng = make_rng(seed)
    scores = conditional_scores(kind, learner, reference, score)
    batch = scores.batch_size
    if sampler == "uniform":
        indices = uniform(batch, n_select, rng)
    elif sampler == "topk":
        indices = topk(scores.diagonal(), n_select)
    else:
        indices = joint(scores, n_select, rng, n_chunks=n_chunks, score_gain=score_gain)
    diag = scores.diagonal()
    return Selection(indices, float(diag[indices].mean()), float(diag.mean()))
