"""The scoring engine: reference outputs (cache first, then ONNX Runtime) and selection.

Synchronous and transport-free: the gRPC servicer runs it in worker threads, and the
embedded scorer (``jest_stream.client.LocalScorer``) calls it in-process, so served and
local selections are the same for the same seed. Inference goes through ``infer``,
which the server replaces with its dynamic batcher.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from jest_stream.cachefile import read_cache_file
from jest_stream.contract import ModelContract
from jest_stream.samplers import DEFAULT_N_CHUNKS
from jest_stream.scores import Embeddings, Losses
from jest_stream.selection import Selection, select

from .cache import ReferenceCache
from .models import ReferenceModel

log = logging.getLogger(__name__)

# (model, job id, inputs of the rows to run) -> outputs of those rows
InferFn = Callable[[ReferenceModel, str, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class UnknownModel(ValueError):
    """A request names a model this scorer did not load."""


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model as ListModels reports it."""

    name: str
    kind: str
    inputs: dict[str, tuple[str, list[int]]]
    outputs: dict[str, tuple[str, list[int]]]
    version: str
    logit_scale: float
    logit_bias: float
    contract: ModelContract = field(repr=False)


@dataclass(frozen=True)
class ReferenceResult:
    outputs: dict[str, np.ndarray]
    hits: int
    misses: int
    version: str


@dataclass(frozen=True)
class SelectResult:
    selection: Selection
    hits: int
    misses: int
    version: str


def _run_directly(model: ReferenceModel, job_id: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return model.run(inputs)


def check_keys(keys: Sequence[str]) -> None:
    """Keys must be non-empty and unique within a super-batch."""
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if not key:
            raise ValueError(f"keys[{i}]: empty key; every example needs a non-empty key (or send no keys)")
        if key in seen:
            raise ValueError(f"keys[{i}]: duplicate key {key!r} (also at {seen[key]}); keys must be unique "
                             "within a super-batch")
        seen[key] = i


class ScoringEngine:
    """Reference models + reference cache + the core's ``select``."""

    def __init__(self, models: Mapping[str, str | os.PathLike], *, cache_bytes: int = 1 << 30,
                 cache_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 providers: Sequence[str] | None = None, infer: InferFn | None = None):
        if not models:
            raise ValueError("models: give at least one NAME=PATH reference model")
        self.models: dict[str, ReferenceModel] = {
            name: ReferenceModel(name, path, intra_op_threads=intra_op_threads,
                                 inter_op_threads=inter_op_threads, providers=providers)
            for name, path in models.items()}
        self.cache = ReferenceCache(cache_bytes)
        self.infer: InferFn = infer or _run_directly
        files = [] if cache_file is None else [cache_file] if isinstance(cache_file, (str, os.PathLike)) else list(cache_file)
        for path in files:
            self.load_cache_file(path)

    def load_cache_file(self, path: str | os.PathLike) -> int:
        """Load a precomputed cache file into the cache; returns the records loaded."""
        version, records = read_cache_file(path)
        if version not in {m.version for m in self.models.values()}:
            log.warning("cache file %s is for model version %s, which no loaded model has; skipped",
                        path, version)
            return 0
        n = 0
        for key, outputs in records:
            self.cache.put(version, key, outputs)
            n += 1
        log.info("loaded %d reference records from %s (version %s)", n, path, version)
        return n

    def model(self, name: str) -> ReferenceModel:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(f"model: unknown model {name!r}; this scorer has {sorted(self.models)}") from None

    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name, m.contract.kind,
                          {s.name: (str(s.dtype), list(s.shape)) for s in m.inputs},
                          {s.name: (str(s.dtype), list(s.shape)) for s in m.outputs},
                          m.version, m.contract.logit_scale, m.contract.logit_bias, m.contract)
                for name, m in self.models.items()]

    def reference(self, model: str, keys: Sequence[str] | None, inputs: Mapping[str, np.ndarray] | None,
                  job_id: str = "") -> ReferenceResult:
        """Reference outputs for a super-batch: cached rows from the cache, the rest run."""
        m = self.model(model)
        keys = list(keys or [])
        inputs = dict(inputs or {})
        if keys:
            check_keys(keys)
        batch = m.check_inputs(inputs, len(keys) if keys else None) if inputs else len(keys)
        if not keys and not inputs:
            raise ValueError("inputs: give the reference model's inputs, or keys already in the cache")
        if not keys:
            return ReferenceResult(self.infer(m, job_id, inputs), 0, batch, m.version)
        entries = self.cache.get_many(m.version, keys)
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing and not inputs:
            shown = [keys[i] for i in missing[:10]]
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(f"inputs: keys {shown}{more} are not in the reference cache; send inputs "
                             "for this super-batch")
        if missing:
            rows = np.asarray(missing)
            fresh = self.infer(m, job_id, {k: v[rows] for k, v in inputs.items()})
            self.cache.put_batch(m.version, [keys[i] for i in missing], fresh)
            for j, i in enumerate(missing):
                entries[i] = {name: value[j] for name, value in fresh.items()}
        outputs = {name: np.stack([e[name] for e in entries]) for name in m.contract.outputs}
        return ReferenceResult(outputs, batch - len(missing), len(missing), m.version)

    def select(self, model: str, *, learner: Losses | Embeddings, n_select: int,
               keys: Sequence[str] | None = None, inputs: Mapping[str, np.ndarray] | None = None,
               score: str = "learnability", sampler: str = "joint", n_chunks: int = DEFAULT_N_CHUNKS,
               score_gain: float = 1.0, seed: int | None = None, job_id: str = "") -> SelectResult:
        """Reference outputs + learner scores -> the selected indices (the core's select)."""
        m = self.model(model)
        batch = learner.batch_size
        if keys and len(keys) != batch:
            raise ValueError(f"keys: {len(keys)} keys but the learner scored {batch} examples")
        needs_reference = score != "hard_learner"
        if needs_reference:
            ref = self.reference(model, keys, inputs, job_id)
            out = ref.outputs
            first = next(iter(out.values()))
            if first.shape[0] != batch:
                raise ValueError(f"inputs: {first.shape[0]} rows but the learner scored {batch} examples")
            if m.contract.kind == "per_example":
                reference = Losses(out["loss"].reshape(-1))
            else:
                reference = Embeddings(out["image_embeds"], out["text_embeds"],
                                       m.contract.logit_scale, m.contract.logit_bias)
            hits, misses = ref.hits, ref.misses
        else:
            reference, hits, misses = None, 0, 0
        selection = select(n_select, kind=m.contract.kind, learner=learner, reference=reference,
                           score=score, sampler=sampler, n_chunks=n_chunks, score_gain=score_gain, seed=seed)
        return SelectResult(selection, hits, misses, m.version)

    def close(self) -> None:
        self.models.clear()
