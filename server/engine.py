"""The scoring engine: reference outputs (cache first, then ONNX Runtime) and selection.

Synchronous and transport-free: the embedded scorer (``jest_stream.client.LocalScorer``)
calls ``ScoringEngine.select`` in-process, and the gRPC servicer calls the same steps
one by one so that reference inference can go through its dynamic batcher:

1. ``plan_select`` / ``plan_reference``: check the request, look its keys up in the
   cache, and gather the inputs of the rows that missed (``Plan.run_inputs``);
2. run those rows through the model (``ReferenceModel.run``, or the batcher);
3. ``complete_reference``: put the fresh rows in the cache and assemble B rows;
   ``finish_select``: the core's ``select`` on learner and reference outputs.

``select`` is exactly 1-2-3 with step 2 run directly, so served and local selections
are the same for the same seed. Bad input raises ValueError naming the field.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jest_stream.contract import ModelSpec
from jest_stream.options import SelectOptions, check_name
from jest_stream.outputs import Embeddings, Losses
from jest_stream.samplers import check_sizes
from jest_stream.diagnostics import loss_summary
from jest_stream.selection import Selection, expected_outputs, make_rng, select

from . import device as devices
from .cache import ReferenceCache
from .cacheload import load_cache_file, nonfinite_rows
from .models import ReferenceModel
from .names import shown_keys

log = logging.getLogger(__name__)



class UnknownModel(ValueError):
    """A request names a model this scorer did not load."""


class NotCached(ValueError):
    """A request sent keys without inputs and some of them are not cached: the client
    must send this super-batch's inputs (a signal, not only a message: see the servicer)."""

    def __init__(self, message: str, count: int):
        super().__init__(message)
        self.count = count


@dataclass(frozen=True)
class ReferenceResult:
    """Reference outputs of a super-batch (B rows each) and how many rows came from the cache."""

    outputs: dict[str, np.ndarray]
    hits: int
    misses: int
    version: str
    nonfinite: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    """Rows whose reference outputs are not finite (never cached, never selected)."""


@dataclass(frozen=True)
class Scored:
    """A served selection and how many examples were left out for non-finite reference outputs."""

    selection: Selection
    nonfinite: int = 0


@dataclass
class ReferencePlan:
    """A reference request after the cache lookup: what is known, what must still run."""

    model: ReferenceModel
    keys: list[str] | None
    batch: int
    cached: dict[str, np.ndarray] | None   # B rows, filled where the key hit the cache
    missing: np.ndarray                     # row indices to run through the model
    run_inputs: dict[str, np.ndarray] | None  # the inputs of those rows (None: nothing to run)
    dataset: str = ""                       # the cache namespace of the keys


@dataclass
class SelectPlan:
    """A checked Select request: its reference plan (None if the score needs no reference)
    and the selection arguments."""

    model: ReferenceModel
    reference: ReferencePlan | None
    learner: Losses | Embeddings
    n_select: int
    options: SelectOptions
    seed: int | None

    @property
    def run_inputs(self) -> dict[str, np.ndarray] | None:
        return None if self.reference is None else self.reference.run_inputs


def check_keys(keys: Sequence[str]) -> None:
    """Keys must be non-empty and unique within a super-batch."""
    unique = set(keys)
    if len(unique) == len(keys) and "" not in unique:
        return
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if not key:
            raise ValueError(f"keys[{i}]: empty key; every example needs a non-empty key (or send no keys)")
        if key in seen:
            raise ValueError(f"keys[{i}]: duplicate key {key!r} (also at keys[{seen[key]}]); keys must be "
                             "unique within a super-batch")
        seen[key] = i


def _distinct(indices: np.ndarray, batch: int) -> bool:
    """True if no index repeats (a mask over the batch: cheaper than np.unique's sort)."""
    seen = np.zeros(batch, dtype=bool)
    seen[indices] = True
    return int(np.count_nonzero(seen)) == indices.size


def _rows(arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {name: value[idx] for name, value in arrays.items()}


def _subset(outputs: Losses | Embeddings, keep: np.ndarray) -> Losses | Embeddings:
    """The rows ``keep`` of a model's outputs (on the host: the rare path of non-finite rows)."""
    if isinstance(outputs, Losses):
        return Losses(devices.to_host(outputs.values)[keep])
    return Embeddings(devices.to_host(outputs.image)[keep], devices.to_host(outputs.text)[keep],
                      outputs.logit_scale, outputs.logit_bias)


class ScoringEngine:
    """Reference models + reference cache + the core's ``select``."""

    def __init__(self, models: Mapping[str, str | os.PathLike], *, cache_bytes: int = 1 << 30,
                 cache_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 providers: Sequence[str] | None = None, device: str | None = None):
        if not models:
            raise ValueError("models: give at least one NAME=PATH reference model")
        if device is not None:
            check_name(device, devices.DEVICES, "device")
        if device == "cuda":
            devices.require_cuda()
        self.device = device
        self.models: dict[str, ReferenceModel] = {
            name: ReferenceModel(name, path, intra_op_threads=intra_op_threads,
                                 inter_op_threads=inter_op_threads, providers=providers, device=device)
            for name, path in models.items()}
        self.cache = ReferenceCache(cache_bytes)
        if cache_file is None:
            files = []
        elif isinstance(cache_file, (str, os.PathLike)):
            files = [cache_file]
        else:
            files = list(cache_file)
        for path in files:
            self.load_cache_file(path)

    # -- models ---------------------------------------------------------------------

    def model(self, name: str) -> ReferenceModel:
        """The loaded model called ``name``; UnknownModel (a ValueError) naming the field if none."""
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(f"model: unknown model {name!r}; this scorer has {sorted(self.models)}") from None

    def list_models(self) -> list[ModelSpec]:
        """Every loaded model: name, kind, inputs, outputs, version, logit scale and bias."""
        return [m.spec for m in self.models.values()]

    # -- the cache file -------------------------------------------------------------

    def load_cache_file(self, path: str | os.PathLike) -> int:
        """Load a precomputed cache file into the cache (see ``cacheload.load_cache_file``)."""
        return load_cache_file(self.cache, self.models.values(), path)

    # -- reference outputs ------------------------------------------------------------

    def plan_reference(self, model: str, keys: Sequence[str] | None,
                       inputs: Mapping[str, np.ndarray] | None, *, batch: int | None = None,
                       dataset: str = "") -> ReferencePlan:
        """Check a reference request and look its keys up in the cache of ``dataset``
        (the request's namespace).

        ``batch`` (if known, e.g. from the learner's scores) is the B that keys and
        inputs must match.
        """
        m = self.model(model)
        keys = list(keys) if keys else None
        inputs = dict(inputs) if inputs else None
        if keys is not None:
            check_keys(keys)
            if batch is not None and len(keys) != batch:
                raise ValueError(f"keys: {len(keys)} keys but the learner scored {batch} examples; "
                                 "send one key per example")
            batch = len(keys)
        if inputs is not None:
            rows = m.check_inputs(inputs, batch)
            if batch is None:
                batch = rows
        if keys is None:
            if inputs is None:
                raise ValueError(f"inputs: model {m.name!r} needs its inputs {[s.name for s in m.inputs]}, "
                                 "or keys that are already in the reference cache")
            return ReferencePlan(m, None, batch, None, np.arange(batch, dtype=np.int64), inputs)
        cached, missing = self.cache.get(m.version, keys, dataset)
        if missing.size and inputs is None:
            raise NotCached(f"inputs: keys {shown_keys([keys[i] for i in missing[:3]], int(missing.size))} "
                            f"are not in the reference cache of model {m.name!r}; send the inputs of "
                            "this super-batch", int(missing.size))
        if not missing.size:
            run_inputs = None
        elif missing.size == batch:
            run_inputs = inputs
        else:
            run_inputs = _rows(inputs, missing)
        return ReferencePlan(m, keys, batch, cached, missing, run_inputs, dataset)

    def complete_reference(self, plan: ReferencePlan, fresh: Mapping[str, np.ndarray] | None,
                           on_device: bool = False) -> ReferenceResult:
        """Cache the fresh outputs of the missing rows (the finite ones) and assemble all B rows
        (host arrays; with ``on_device``, fresh GPU outputs of a batch that missed entirely stay there)."""
        m = plan.model
        n_miss = int(plan.missing.size)
        device_fresh = fresh
        bad = np.empty(0, np.int64)
        if n_miss:
            if fresh is None:
                raise RuntimeError("complete_reference: the plan has rows to run but no outputs were given")
            m.check_rows(fresh, n_miss)
            fresh = {name: devices.to_host(fresh[name]) for name in m.contract.outputs}
            bad = nonfinite_rows(fresh, n_miss)
            if plan.keys is not None:
                self._cache_fresh(plan, fresh, bad)
        if plan.cached is None:
            outputs = {name: (device_fresh if on_device else fresh)[name] for name in m.contract.outputs}
        else:
            outputs = plan.cached
            if n_miss:
                for name in m.contract.outputs:
                    outputs[name][plan.missing] = fresh[name]
        return ReferenceResult(outputs, plan.batch - n_miss, n_miss, m.version, plan.missing[bad])

    def _cache_fresh(self, plan: ReferencePlan, fresh: Mapping[str, np.ndarray], bad: np.ndarray) -> None:
        """Cache the fresh rows of a plan, except those that are not finite (never cached)."""
        n_miss = int(plan.missing.size)
        keys = [plan.keys[i] for i in plan.missing] if n_miss != plan.batch else plan.keys
        if bad.size:
            good = np.setdiff1d(np.arange(n_miss), bad, assume_unique=True)
            keys = [keys[i] for i in good]
            fresh = _rows(fresh, good)
            log.warning("model %s: %d example(s) gave non-finite reference outputs (not cached, never "
                        "selected)", plan.model.name, int(bad.size))
        self.cache.put_batch(plan.model.version, keys, fresh, plan.dataset)

    def reference(self, model: str, keys: Sequence[str] | None,
                  inputs: Mapping[str, np.ndarray] | None, dataset: str = "") -> ReferenceResult:
        """Reference outputs for a super-batch: cached rows from the cache, the rest run."""
        plan = self.plan_reference(model, keys, inputs, dataset=dataset)
        fresh = plan.model.run(plan.run_inputs) if plan.run_inputs is not None else None
        return self.complete_reference(plan, fresh)

    # -- selection ----------------------------------------------------------------------

    def plan_select(self, model: str, *, learner: Losses | Embeddings, n_select: int,
                    keys: Sequence[str] | None = None, inputs: Mapping[str, np.ndarray] | None = None,
                    options: SelectOptions = SelectOptions(), seed: int | None = None,
                    dataset: str = "") -> SelectPlan:
        """Check everything a Select needs before any inference is spent on it
        (``options`` is already validated: it was built where the request entered;
        ``dataset`` is the request's cache namespace)."""
        m = self.model(model)
        kind = m.contract.kind
        want = expected_outputs(kind)
        if not isinstance(learner, want):
            raise ValueError(f"learner: model {model!r} is {kind}, so the learner must send "
                             f"{'losses (B,)' if want is Losses else 'image_embeds and text_embeds (B, d)'}")
        learner = learner.validated("learner")
        batch = learner.batch_size
        check_sizes(batch, n_select)
        make_rng(seed)  # checks the seed
        reference = None
        if options.needs_reference:
            reference = self.plan_reference(model, keys, inputs, batch=batch, dataset=dataset)
        elif keys is not None and len(keys) and len(keys) != batch:
            raise ValueError(f"keys: {len(keys)} keys but the learner scored {batch} examples")
        return SelectPlan(m, reference, learner, int(n_select), options, seed)

    def finish_select(self, plan: SelectPlan, fresh: Mapping[str, np.ndarray] | None) -> Scored:
        """Complete the reference outputs and run the core's ``select`` on the examples
        whose reference outputs are finite (the others are never selected, only counted)."""
        m = plan.model
        reference, hits, misses, bad = None, 0, 0, np.empty(0, np.int64)
        if plan.reference is not None:
            ref = self.complete_reference(plan.reference, fresh, on_device=self.device == "cuda")
            reference = m.spec.outputs_from(ref.outputs)
            hits, misses, bad = ref.hits, ref.misses, ref.nonfinite
        batch = plan.learner.batch_size
        learner, keep = plan.learner, None
        if bad.size:
            keep = np.setdiff1d(np.arange(batch), bad, assume_unique=True)
            if keep.size < plan.n_select:
                raise ValueError(f"inputs: only {keep.size} of {batch} examples have finite reference outputs, "
                                 f"fewer than n_select={plan.n_select}; check the inputs for overflow")
            learner, reference = _subset(learner, keep), _subset(reference, keep)
        placed_learner, placed = learner, reference
        if self.device == "cuda":  # selection on the GPU: CuPy arrays through the core's select
            placed_learner = devices.on_device(learner)
            placed = None if reference is None else devices.on_device(reference)
        selection = select(plan.n_select, kind=m.contract.kind, learner=placed_learner, reference=placed,
                           options=plan.options, seed=plan.seed)
        indices = selection.indices
        if not np.isfinite(selection.mean_score_all) or not _distinct(indices, learner.batch_size):
            raise ValueError("learner: the scores are not finite once combined with the reference (overflow); "
                             "scale down the learner's losses, embeddings, logit_scale/logit_bias or score_gain")
        losses = loss_summary(m.contract.kind, learner if plan.options.needs_learner else None, reference)
        if keep is not None:
            indices = keep[indices]
        selection = dataclasses.replace(selection, indices=indices, cache_hits=hits, cache_misses=misses,
                                        model_version=m.version, **losses.as_fields())
        return Scored(selection, int(bad.size))

    def select(self, model: str, *, learner: Losses | Embeddings, n_select: int,
               keys: Sequence[str] | None = None, inputs: Mapping[str, np.ndarray] | None = None,
               options: SelectOptions = SelectOptions(), seed: int | None = None,
               dataset: str = "") -> Selection:
        """Reference outputs + learner scores -> the selected indices (the core's select)."""
        plan = self.plan_select(model, learner=learner, n_select=n_select, keys=keys, inputs=inputs,
                                options=options, seed=seed, dataset=dataset)
        run = plan.run_inputs
        fresh = plan.model.run(run) if run is not None else None
        return self.finish_select(plan, fresh).selection

    def close(self) -> None:
        """Drop the sessions (their memory goes with them)."""
        self.models.clear()
