"""ReferenceWatch: warn once when the reference stops knowing better than the learner.

Learnability (learner loss - reference loss) picks what the learner has yet to learn
*and* the reference has learned. When the reference's loss is above the learner's on
most examples for many steps, either the reference is weak (trained on too little or
too different data) or the learner has overtaken it, and learnability selection can
end below uniform selection. The scorer reports, per super-batch, the share of
examples whose reference loss exceeds the learner's; the watch averages it over a
window of scored steps and logs one warning when the average passes a threshold.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from jest_stream.client.stats import LoaderStats

log = logging.getLogger("jest_stream.client.loader")

DEFAULT_SHARE = 0.5
DEFAULT_WINDOW = 50


@dataclass(frozen=True)
class ReferenceWatch:
    """When to warn: the reference's loss above the learner's on more than ``share`` of
    the examples (default 0.5, "most"), averaged over the last ``window`` scored steps
    (default 50). Raises ValueError naming the field on a bad value."""

    share: float = DEFAULT_SHARE
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) \
                or not 0.0 <= self.share < 1.0:
            raise ValueError(f"reference_watch.share: expected a fraction in [0, 1), got {self.share!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"reference_watch.window: expected an integer >= 1, got {self.window!r}")


class ReferenceWatcher:
    """The running state of a ReferenceWatch (None: never warn)."""

    def __init__(self, watch: ReferenceWatch | None):
        if watch is not None and not isinstance(watch, ReferenceWatch):
            raise TypeError(f"reference_watch: expected a ReferenceWatch or None, got {type(watch).__name__}")
        self.watch = watch
        self.warned = False
        self._recent: deque = deque(maxlen=watch.window if watch else 1)

    def observe(self, selection: Any, stats: LoaderStats, job_id: str, step: int) -> bool:
        """Record one scored step's diagnostics (a Selection's) into ``stats`` and the window;
        log the warning (once) and return True when it fires."""
        learner_loss, reference_loss, above = (
            getattr(selection, name, math.nan)
            for name in ("mean_learner_loss", "mean_reference_loss", "reference_above_learner"))
        stats.record_losses(learner_loss, reference_loss, above)
        if self.watch is None or self.warned or not math.isfinite(above):
            return False
        self._recent.append((above, learner_loss, reference_loss))
        if len(self._recent) < self.watch.window:
            return False
        share = sum(r[0] for r in self._recent) / len(self._recent)
        if share <= self.watch.share:
            return False
        self.warned = True
        learner = sum(r[1] for r in self._recent) / len(self._recent)
        reference = sum(r[2] for r in self._recent) / len(self._recent)
        log.warning(
            "%s: at step %d the reference's loss has been above the learner's on %.0f%% of examples "
            "over the last %d scored steps (mean loss: reference %.4f, learner %.4f). The reference "
            "is weak or the learner has overtaken it, and learnability selection may now do worse "
            "than uniform: retrain the reference on more clean data, lower filter_ratio, or use "
            "score='hard_learner' (see docs/client.md). Logged once.",
            job_id, step, 100 * share, len(self._recent), reference, learner)
        return True
