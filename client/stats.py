"""LoaderStats: what the JESTLoader did, counted as it goes.

Sub-batches, examples seen and selected, mean score (learnability) of the selected
examples and of whole super-batches, the learner's and the reference's mean loss on
the super-batches (and the share of examples where the reference's is the higher),
reference-cache figures, fallbacks by reason, and
where the loader's time went: fetching super-batches, the learner's own scoring
(``score_fn``), waiting on the scorer, and the rest (``total_seconds`` covers all
of it, the training step excluded), so that the loader's own overhead is
``total_seconds - learner_seconds`` beside a plain DataLoader.

Two cache figures: ``cache_hits``/``cache_misses`` are what the Select replies say;
against a server, the prefetch has already warmed the cache, so they show hits from
step 1. ``reference_cached``/``reference_inferred`` count each super-batch's rows at
first contact (the prefetch's Reference reply when there was one, else the Select's):
rows served from the cache vs rows the reference model ran on.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass
class LoaderStats:
    """Running counters of a JESTLoader (``loader.stats``); restored by load_state_dict."""

    sub_batches: int = 0
    examples_seen: int = 0
    examples_selected: int = 0
    scored: int = 0
    score_sum: float = 0.0
    score_all_sum: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    loss_steps: int = 0
    learner_loss_sum: float = 0.0
    reference_loss_sum: float = 0.0
    reference_above_sum: float = 0.0
    last_learner_loss: float = math.nan
    last_reference_loss: float = math.nan
    last_reference_above: float = math.nan
    reference_cached: int = 0
    reference_inferred: int = 0
    fallbacks: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    fetch_seconds: float = 0.0
    learner_seconds: float = 0.0
    scorer_seconds: float = 0.0
    total_seconds: float = 0.0
    _latencies: deque = field(default_factory=lambda: deque(maxlen=1024), repr=False)

    def record_selection(self, seen: int, selected: int) -> None:
        self.sub_batches += 1
        self.examples_seen += seen
        self.examples_selected += selected

    def record_score(self, mean_score: float, mean_score_all: float, hits: int, misses: int) -> None:
        self.scored += 1
        self.score_sum += mean_score
        self.score_all_sum += mean_score_all
        self.cache_hits += hits
        self.cache_misses += misses

    def record_losses(self, learner_loss: float, reference_loss: float, reference_above: float) -> None:
        """One super-batch's loss diagnostics (from the scorer; NaN where not computed);
        the running means count the steps where both models were scored."""
        self.last_learner_loss = learner_loss
        self.last_reference_loss = reference_loss
        self.last_reference_above = reference_above
        if math.isfinite(learner_loss) and math.isfinite(reference_loss) and math.isfinite(reference_above):
            self.loss_steps += 1
            self.learner_loss_sum += learner_loss
            self.reference_loss_sum += reference_loss
            self.reference_above_sum += reference_above

    def record_reference(self, cached: int, inferred: int) -> None:
        """One super-batch's rows at first contact: from the cache, or inferred."""
        self.reference_cached += cached
        self.reference_inferred += inferred

    def record_latency(self, seconds: float) -> None:
        self.scorer_seconds += seconds
        self._latencies.append(seconds)

    def record_fallback(self, reason: str) -> None:
        self.fallbacks += 1
        self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1

    @property
    def mean_score(self) -> float:
        """Mean score (learnability by default) of the selected examples, scored steps only."""
        return self.score_sum / self.scored if self.scored else float("nan")

    @property
    def mean_score_all(self) -> float:
        """Mean score of whole super-batches: what uniform selection would have got."""
        return self.score_all_sum / self.scored if self.scored else float("nan")

    @property
    def score_gain_over_all(self) -> float:
        """Selected-vs-all: how much selection raised the mean score above the super-batch's."""
        return self.mean_score - self.mean_score_all

    @property
    def mean_learner_loss(self) -> float:
        """The learner's mean per-example loss on the super-batches (steps with both models scored)."""
        return self.learner_loss_sum / self.loss_steps if self.loss_steps else float("nan")

    @property
    def mean_reference_loss(self) -> float:
        """The reference's mean per-example loss on the same super-batches."""
        return self.reference_loss_sum / self.loss_steps if self.loss_steps else float("nan")

    @property
    def mean_reference_above(self) -> float:
        """The mean share of examples whose reference loss exceeded the learner's."""
        return self.reference_above_sum / self.loss_steps if self.loss_steps else float("nan")

    def latency_ms(self, quantile: float) -> float:
        """A quantile of the recent scorer latencies (the last 1024 calls), in ms."""
        if not self._latencies:
            return float("nan")
        return float(np.quantile(np.fromiter(self._latencies, float), quantile) * 1e3)

    @property
    def overhead_seconds(self) -> float:
        """Time in the loader beyond the learner's own scoring: fetching, scorer, indexing."""
        return self.total_seconds - self.learner_seconds

    def as_dict(self) -> dict[str, Any]:
        """Counters and derived figures, JSON-ready."""
        out = self.state_dict()
        out.update(mean_score=self.mean_score, mean_score_all=self.mean_score_all,
                   score_gain_over_all=self.score_gain_over_all,
                   mean_learner_loss=self.mean_learner_loss, mean_reference_loss=self.mean_reference_loss,
                   mean_reference_above=self.mean_reference_above,
                   scorer_latency_p50_ms=self.latency_ms(0.5),
                   scorer_latency_p95_ms=self.latency_ms(0.95),
                   overhead_seconds=self.overhead_seconds)
        return out

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Every figure as a flat ``{name: number}`` dict (fallback reasons as
        ``fallbacks/<reason>``), ready for ``SummaryWriter.add_scalar``, ``wandb.log`` or
        Lightning's ``log_dict``; ``prefix`` (e.g. ``"jest/"``) goes before each name."""
        flat: dict[str, float] = {}
        for name, value in self.as_dict().items():
            if isinstance(value, dict):
                flat.update({f"{name}/{k}": float(v) for k, v in value.items()})
            else:
                flat[name] = float(value)
        rows = self.reference_cached + self.reference_inferred
        flat["reference_cached_fraction"] = self.reference_cached / rows if rows else float("nan")
        return {prefix + k: v for k, v in flat.items()}

    def state_dict(self) -> dict[str, Any]:
        """The counters (not the latency window), for the loader's state_dict."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["fallback_reasons"] = dict(self.fallback_reasons)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters saved by ``state_dict``."""
        for key, value in state.items():
            if hasattr(self, key) and not key.startswith("_"):
                setattr(self, key, dict(value) if isinstance(value, dict) else value)

    def summary(self) -> str:
        """One log line."""
        return (f"sub-batches {self.sub_batches}, selected {self.examples_selected}/{self.examples_seen}, "
                f"mean score {self.mean_score:.4f} (all {self.mean_score_all:.4f}), "
                f"loss learner {self.last_learner_loss:.4f} reference {self.last_reference_loss:.4f} "
                f"(reference above on {100 * self.last_reference_above:.0f}%), "
                f"cache hits {self.cache_hits}/{self.cache_hits + self.cache_misses}, "
                f"scorer p50 {self.latency_ms(0.5):.2f} ms p95 {self.latency_ms(0.95):.2f} ms, "
                f"fallbacks {self.fallbacks}")
