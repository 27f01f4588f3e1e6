"""SelectOptions: how one super-batch is selected, validated once where it enters.

The loader, the servicer (from the wire) and the embedded scorer build one
``SelectOptions``; everything after them (the engine, ``select()``, the samplers)
takes it as it is. The defaults live here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# Score rule -> (learner weight, reference weight) on the losses:
# learnability = l(learner) - l(reference) (JEST, RHO-LOSS), hard_learner = l(learner),
# easy_reference = -l(reference).
SCORE_WEIGHTS: dict[str, tuple[float, float]] = {
    "learnability": (1.0, -1.0),
    "hard_learner": (1.0, 0.0),
    "easy_reference": (0.0, -1.0),
}
SCORES: tuple[str, ...] = tuple(SCORE_WEIGHTS)
SAMPLERS: tuple[str, ...] = ("joint", "topk", "uniform")
DEFAULT_N_CHUNKS = 16
# Softmax candidate score: the exact marginal gain of the set's batch loss, or the
# candidate's own loss within S + {i} alone (see jest_stream.softmax_scores).
SOFTMAX_SCORES: tuple[str, ...] = ("marginal", "own")
# What the joint sampler's conditional scores see of the sub-batch still to come:
# "in_batch" (the default) counts the rest of the set as a uniformly random completion
# from the super-batch (each candidate's pairs with it, each softmax's context over it),
# from one in-batch B x B x d pass per model; "none" is JEST's rule as published, the
# selected set only (sigmoid's first chunk then sees S_ii alone). See
# jest_stream.conditional and jest_stream.softmax_scores for the measurements.
LOOKAHEADS: tuple[str, ...] = ("in_batch", "none")
# score_gain=None means the loss kind's default, chosen on the quality tests' harness
# (clusters of learnable hard negatives; mean batch learnability J of joint's sets,
# 20 seeds, B = 256 and 1024, f = 0.5 / 0.8 / 0.9; with the default lookahead):
# - per_example 1: joint is then exactly exp(score)-weighted sampling without replacement;
# - sigmoid 1: its conditional scores sum |S| pair terms, so they are large already; J
#   summed over the six settings was 156.1 at gain 1, 155.1 at 3, 155.9 at 10;
# - softmax 30: its scores are per-member log-sum-exp changes, ~100x smaller; summed J was
#   1.98 at gain 10, 2.26 at 30, 2.34 at 100 (at gain 1, JEST's rule sat near uniform).
#   100 edges 30 on the harness; 30 is what the large-batch learning benchmark ran with
#   (docs/demo.md), so it stays.
DEFAULT_GAINS: dict[str, float] = {
    "per_example": 1.0,
    "sigmoid_contrastive": 1.0,
    "softmax_contrastive": 30.0,
}


def check_name(value: str, allowed: tuple[str, ...], field: str) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming ``field``."""
    if value not in allowed:
        raise ValueError(f"{field}: unknown value {value!r}; expected one of {', '.join(allowed)}")
    return value


def check_int(value: Any, field: str, minimum: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else a ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SelectOptions:
    """The selection rule: score (learnability, hard_learner, easy_reference), sampler
    (joint, topk, uniform), the joint sampler's chunk count, the score gain (how greedy
    the sampler is; None: the loss kind's default, ``gain_for(kind)``), the softmax
    candidate score (marginal, own) and what the joint sampler's scores see of the rest
    of the sub-batch (lookahead: in_batch, none). Raises ValueError naming the field on
    a bad value."""

    score: str = "learnability"
    sampler: str = "joint"
    n_chunks: int = DEFAULT_N_CHUNKS
    score_gain: float | None = None
    softmax_score: str = "marginal"
    lookahead: str = "in_batch"

    def __post_init__(self) -> None:
        check_name(self.score, SCORES, "score")
        check_name(self.sampler, SAMPLERS, "sampler")
        check_name(self.softmax_score, SOFTMAX_SCORES, "softmax_score")
        check_name(self.lookahead, LOOKAHEADS, "lookahead")
        object.__setattr__(self, "n_chunks", check_int(self.n_chunks, "n_chunks", 1))
        gain = self.score_gain
        if gain is None:
            return
        if isinstance(gain, bool) or not isinstance(gain, (int, float, np.floating, np.integer)) \
                or not np.isfinite(gain) or gain <= 0:
            raise ValueError(f"score_gain: must be a positive finite number or None (the kind's default), "
                             f"got {gain!r}; for random sub-batches use sampler='uniform'")
        object.__setattr__(self, "score_gain", float(gain))

    def gain_for(self, kind: str) -> float:
        """The score gain for loss ``kind``: ``score_gain`` if set, else the kind's default."""
        return DEFAULT_GAINS[kind] if self.score_gain is None else self.score_gain

    @property
    def needs_learner(self) -> bool:
        return bool(SCORE_WEIGHTS[self.score][0])

    @property
    def needs_reference(self) -> bool:
        return bool(SCORE_WEIGHTS[self.score][1])

    @classmethod
    def of(cls, options: SelectOptions | None = None, **given: Any) -> SelectOptions:
        """``options`` as given, or options from keyword arguments where None means the default
        (what JESTLoader takes); giving both is an error naming the fields."""
        set_fields = {k: v for k, v in given.items() if v is not None}
        if options is None:
            return cls(**set_fields)
        if not isinstance(options, cls):
            raise TypeError(f"options: expected a SelectOptions, got {type(options).__name__}")
        if set_fields:
            raise ValueError(f"options: given together with {sorted(set_fields)}; set those fields in "
                             "the SelectOptions instead")
        return options

    @classmethod
    def from_fields(cls, **given: Any) -> SelectOptions:
        """Options from possibly-unset fields (None, "" or 0: the default), as the wire sends them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"options: unknown field(s) {unknown}; expected {sorted(names)}")
        return cls(**{k: v for k, v in given.items() if v not in (None, "", 0)})
