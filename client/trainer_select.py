"""Selection where the embeddings are: the JESTLoader's ``select_on="trainer"``.

``TrainerSelect`` wraps a scorer (or, with ``reference="batch"``, the batch's own
reference fields) and is itself a scorer to the loader: its ``select`` fetches only
the reference outputs (the scorer's ``Reference`` call, prefetched one step ahead
like the scorer-side path) and runs the core's ``select`` here, on the arrays the
learner's ``score_fn`` returned. With torch tensors on a GPU, the reference outputs
are moved there and selection runs in torch on that device (where the core supports
it); no learner outputs travel. The seed, the options and the selection code are the
scorer's, so both placements pick the same indices from the same numbers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from jest_stream.client.scorer import InputsFn, ReferenceOutputs, ScorerRejected, SelectCall
from jest_stream.contract import OUTPUTS_BY_KIND, ModelSpec
from jest_stream.diagnostics import loss_summary
from jest_stream.options import check_name
from jest_stream.outputs import Embeddings, Losses
from jest_stream.selection import Selection, select

PLACES = ("scorer", "trainer")
REFERENCES = ("scorer", "batch")


def _like(array: np.ndarray, like: Any) -> Any:
    """The host array ``array`` where ``like`` lives: a torch tensor on its device, or numpy."""
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(np.require(array, requirements=["C", "W"]), device=like.device)
    return array


def place_like(reference: Losses | Embeddings, learner: Losses | Embeddings) -> Losses | Embeddings:
    """The reference outputs in the learner's array library and on its device."""
    if isinstance(reference, Losses):
        return Losses(_like(reference.values, learner.values))
    anchor = learner.image if isinstance(learner, Embeddings) else None
    return dataclasses.replace(reference, image=_like(reference.image, anchor),
                               text=_like(reference.text, anchor))


class TrainerSelect:
    """A Scorer for the JESTLoader that selects on the trainer from fetched reference outputs.

    ``source`` gives ``models()``, ``prefetch(..., outputs=True)`` and ``reference(...)``:
    a LocalScorer, a RemoteScorer or the loader's BatchReference.
    """

    def __init__(self, source: Any):
        for method in ("models", "prefetch", "reference"):
            if not callable(getattr(source, method, None)):
                raise TypeError(f"scorer: {type(source).__name__} has no {method}(); select_on='trainer' "
                                "needs a LocalScorer or RemoteScorer (or reference='batch')")
        self.source = source

    def __repr__(self) -> str:
        return f"TrainerSelect({self.source!r})"

    def models(self) -> dict[str, ModelSpec]:
        return self.source.models()

    def prefetch(self, model: str, job_id: str, keys: Sequence[str], inputs: InputsFn,
                 outputs: bool = True, dataset: str = "") -> Any:
        return self.source.prefetch(model, job_id, keys, inputs, outputs=True, dataset=dataset)

    def reference(self, model: str, job_id: str, keys: Sequence[str] | None, inputs: InputsFn | None,
                  prefetched: Any = None, dataset: str = "") -> ReferenceOutputs:
        return self.source.reference(model, job_id, keys, inputs, prefetched, dataset=dataset)

    def select(self, call: SelectCall, prefetched: Any = None) -> Selection:
        spec = self.models()[call.model]
        reference = host_reference = None
        ref = ReferenceOutputs({}, model_version=spec.version)
        if call.options.needs_reference:
            ref = self.source.reference(call.model, call.job_id, call.keys, call.inputs, prefetched,
                                        dataset=call.dataset)
            missing = [name for name in OUTPUTS_BY_KIND[spec.kind] if name not in ref.outputs]
            if missing:
                raise ScorerRejected(f"reference: outputs {sorted(ref.outputs)} lack {missing} of model "
                                     f"{spec.name!r}")
            host_reference = spec.outputs_from(ref.outputs)
            reference = place_like(host_reference, call.learner)
        try:
            selection = select(call.n_select, kind=spec.kind, learner=call.learner, reference=reference,
                               options=call.options, seed=call.seed)
        except ValueError as exc:
            raise ScorerRejected(f"trainer-side selection refused the super-batch: {exc}") from exc
        if not np.isfinite(selection.mean_score_all):
            raise ScorerRejected("learner: the scores are not finite once combined with the reference "
                                 "(overflow); scale down the learner's outputs or score_gain")
        # The loss diagnostics the scorer adds to its selections (the loader's ReferenceWatch reads them).
        losses = loss_summary(spec.kind, call.learner if call.options.needs_learner else None, host_reference)
        return dataclasses.replace(selection, cache_hits=ref.cache_hits, cache_misses=ref.cache_misses,
                                   model_version=ref.model_version, **losses.as_fields())

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if callable(close):
            close()


def placement(scorer: Any, select_on: str | None, reference: str, model: str | None) -> tuple[Any, Any]:
    """The scorer the loader talks to for ``select_on`` and ``reference`` (checked here,
    once), and the BatchReference that reads each batch's reference fields (or None)."""
    check_name(reference, REFERENCES, "reference")
    if select_on is None:
        select_on = "trainer" if reference == "batch" else "scorer"
    check_name(select_on, PLACES, "select_on")
    if reference == "batch":
        if select_on != "trainer":
            raise ValueError("select_on: reference='batch' selects on the trainer (the scorer never sees "
                             "the batch's reference outputs); pass select_on='trainer' or leave it unset")
        from jest_stream.client.batch_reference import BatchReference

        batch = BatchReference(scorer, model or "reference")
        return TrainerSelect(batch), batch
    if scorer is None:
        raise TypeError("scorer: None needs reference='batch' (reference outputs stored in the data, "
                        "see jest-stream precompute --write-shards); pass a LocalScorer or RemoteScorer")
    return (TrainerSelect(scorer) if select_on == "trainer" else scorer), None
