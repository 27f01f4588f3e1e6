"""select(): scores of one super-batch in, the indices of its sub-batch out.

The one entry point that the server, the embedded scorer and the benchmarks call,
so that local and remote selections are identical for the same seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jest_stream.conditional import conditional_scores
from jest_stream.options import SelectOptions, check_name
from jest_stream.outputs import LOSS_KINDS, Embeddings, Losses
from jest_stream.samplers import joint, topk, uniform
from jest_stream.xp import to_host

SeedLike = int | np.random.Generator | None


@dataclass(frozen=True)
class Selection:
    """A selection: the chosen indices (in selection order), the mean per-example score
    of the selected examples and of the whole super-batch (how much selection raised it),
    and, when a scorer made it, its reference-cache figures, model version and the
    super-batch's loss diagnostics (jest_stream.diagnostics; NaN where not computed)."""

    indices: np.ndarray
    mean_score: float
    mean_score_all: float
    cache_hits: int = 0
    cache_misses: int = 0
    model_version: str = ""
    mean_learner_loss: float = math.nan
    mean_reference_loss: float = math.nan
    reference_above_learner: float = math.nan


def make_rng(seed: SeedLike) -> np.random.Generator:
    """A numpy Generator from an int seed (or a Generator, passed through; None: fresh)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed: expected a non-negative integer, a numpy Generator or None, got {seed!r}")
    return np.random.default_rng(seed)


def expected_outputs(kind: str) -> type:
    """The outputs type a model of loss ``kind`` gives: Losses or Embeddings."""
    return Losses if check_name(kind, LOSS_KINDS, "kind") == "per_example" else Embeddings


def validated_outputs(kind: str, outputs: Losses | Embeddings | None, field: str) -> Losses | Embeddings:
    """``outputs`` checked (type for ``kind``, shapes, finiteness); ValueError naming ``field``."""
    if outputs is None:
        raise ValueError(f"{field}: required by this score rule, got None")
    cls = expected_outputs(kind)
    if not isinstance(outputs, cls):
        raise ValueError(f"{field}: kind {kind!r} expects {cls.__name__}, got {type(outputs).__name__}")
    return outputs.validated(field)


def select(
    n_select: int,
    *,
    kind: str,
    learner: Losses | Embeddings | None,
    reference: Losses | Embeddings | None,
    options: SelectOptions = SelectOptions(),
    seed: SeedLike = None,
) -> Selection:
    """Select ``n_select`` examples of a super-batch from learner and reference outputs.

    ``kind`` is the loss kind (per_example, sigmoid_contrastive, softmax_contrastive);
    ``options`` the rule (score, sampler, chunks, gain). The outputs may be numpy, torch
    (CPU or CUDA) or CuPy arrays: selection runs where they are, and the indices come
    back as a numpy int64 array. Raises ValueError naming the argument on bad input.
    """
    if not isinstance(options, SelectOptions):
        raise TypeError(f"options: expected a SelectOptions, got {type(options).__name__}")
    learner = validated_outputs(kind, learner, "learner") if options.needs_learner else None
    reference = validated_outputs(kind, reference, "reference") if options.needs_reference else None
    if learner is not None and reference is not None and learner.batch_size != reference.batch_size:
        raise ValueError(
            f"reference: {reference.batch_size} examples but learner has {learner.batch_size}; "
            "both must score the same super-batch"
        )
    rng = make_rng(seed)
    scores = conditional_scores(kind, learner, reference, options.score, options.softmax_score,
                                options.lookahead)
    batch = scores.batch_size
    if options.sampler == "uniform":
        indices = uniform(batch, n_select, rng)
    elif options.sampler == "topk":
        indices = topk(scores.per_example(), n_select)
    else:
        indices = joint(scores, n_select, rng, n_chunks=options.n_chunks,
                        score_gain=options.gain_for(kind))
    diag = to_host(scores.diagonal())
    return Selection(indices, float(diag[indices].mean()), float(diag.mean()))
