"""The Scorer interface the JESTLoader talks to, and LocalScorer, the embedded one.

A scorer knows reference models (``models()``), can warm its reference cache for a
super-batch ahead of time (``prefetch``) and selects a sub-batch from the learner's
scores (``select``). Two implementations share it:

- ``LocalScorer(path)``: the server's ScoringEngine in this process (ONNX Runtime;
  nothing to start), so local and remote selections are identical for the same seed;
- ``RemoteScorer(target)`` (client/remote.py): the shared gRPC scoring server.

Errors split in two, and the loader's ``fallback`` policy only covers the first:
``ScorerUnavailable`` (unreachable, deadline, server failure: retrying later may
work) and ``ScorerRejected`` (bad request, unknown model, wrong token: a
configuration error that retrying will not fix).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jest_stream.outputs import Embeddings, Losses

log = logging.getLogger(__name__)

InputsFn = Callable[[], dict[str, np.ndarray]]


class ScorerError(RuntimeError):
    """The scorer did not answer a request."""


class ScorerUnavailable(ScorerError):
    """The scorer is unreachable, timed out or failed; a later call may succeed."""


class ScorerRejected(ScorerError):
    """The scorer refused the request (bad input, unknown model, authentication)."""


@dataclass(frozen=True)
class ModelSpec:
    """A reference model as the client sees it: its loss kind and inputs (name ->
    (dtype, shape with -1 for dynamic axes)), in the order the model declares them."""

    name: str
    kind: str
    inputs: dict[str, tuple[np.dtype, tuple[int, ...]]]
    version: str = ""
    logit_scale: float = 1.0
    logit_bias: float = 0.0


@dataclass(frozen=True)
class SelectCall:
    """One super-batch's selection request. ``inputs`` is called only if the
    scorer needs the reference inputs (keys missing from its cache, or no keys)."""

    model: str
    job_id: str
    learner: Losses | Embeddings
    n_select: int
    keys: Sequence[str] | None = None
    inputs: InputsFn | None = None
    score: str = "learnability"
    sampler: str = "joint"
    n_chunks: int = 16
    score_gain: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class SelectOutcome:
    """The selected indices (selection order), mean diagonal score of the selected
    examples and of the whole super-batch, and reference-cache hits/misses."""

    indices: np.ndarray
    mean_score: float
    mean_score_all: float
    cache_hits: int = 0
    cache_misses: int = 0
    version: str = ""


@runtime_checkable
class Scorer(Protocol):
    """What the JESTLoader needs from a scorer (local or remote)."""

    def models(self) -> dict[str, ModelSpec]:
        """The reference models the scorer serves, by name."""

    def prefetch(self, model: str, job_id: str, keys: Sequence[str], inputs: InputsFn) -> Any:
        """Start warming the reference cache for these keys; return a handle for
        ``select`` (or None if there is nothing to wait for)."""

    def select(self, call: SelectCall, prefetched: Any = None) -> SelectOutcome:
        """Select ``call.n_select`` examples; raise ScorerUnavailable or ScorerRejected."""

    def close(self) -> None:
        """Release channels, threads and sessions."""


class KeyMemory:
    """Keys a scorer has been sent with their inputs, per model (bounded: cleared when full, and
    when the model's version changes)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._keys: dict[str, set[str]] = {}
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()

    def has_all(self, model: str, keys: Sequence[str]) -> bool:
        with self._lock:
            known = self._keys.get(model)
            return bool(known) and known.issuperset(keys)

    def add(self, model: str, keys: Sequence[str], version: str = "") -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            known = self._keys.setdefault(model, set())
            if version and self._versions.get(model) != version:
                known.clear()
                self._versions[model] = version
            if len(known) + len(keys) > self.capacity:
                known.clear()
            known.update(keys)

    def forget(self, model: str) -> None:
        with self._lock:
            self._keys.pop(model, None)


def resolve_model(scorer: Scorer, model: str | None) -> ModelSpec:
    """The spec of ``model``, or of the scorer's only model when ``model`` is None."""
    models = scorer.models()
    if model is None:
        if len(models) != 1:
            raise ScorerRejected(f"model: the scorer serves {sorted(models)}; pass model=<name> to "
                                 "JESTLoader to say which one")
        return next(iter(models.values()))
    if model not in models:
        raise ScorerRejected(f"model: {model!r} is not served; the scorer has {sorted(models)}")
    return models[model]


def _spec_from_engine(info: Any) -> ModelSpec:
    inputs = {}
    for name, value in dict(info.inputs).items():
        dtype, shape = value
        inputs[name] = (np.dtype(dtype), tuple(int(n) if n is not None else -1 for n in shape))
    return ModelSpec(info.name, info.kind, inputs, str(getattr(info, "version", "")),
                     float(getattr(info, "logit_scale", 1.0) or 1.0),
                     float(getattr(info, "logit_bias", 0.0) or 0.0))


class LocalScorer:
    """The embedded scorer: the server's ScoringEngine (ONNX Runtime) in this process.

    ``path`` is one reference model (named ``name``, default the file stem) or a
    mapping name -> path. The engine starts on first use, in the process that uses
    it, so a LocalScorer built before DataLoader workers fork holds no ORT session.
    Reference inference runs inline in ``select`` (``prefetch`` does nothing):
    in-process, that is the cheapest path.
    """

    def __init__(self, path: str | os.PathLike | Mapping[str, str | os.PathLike], *,
                 name: str | None = None, cache_bytes: int = 1 << 30, cache_file: str | None = None,
                 intra_op_threads: int | None = None, providers: Sequence[str] | None = None):
        if isinstance(path, Mapping):
            if name is not None:
                raise ValueError("name: give names as the keys of the path mapping instead")
            self._paths = {str(k): os.fspath(v) for k, v in path.items()}
        else:
            self._paths = {name or Path(path).stem: os.fspath(path)}
        for model, p in self._paths.items():
            if not Path(p).is_file():
                raise FileNotFoundError(f"path: reference model {model!r} file {p!r} does not exist; "
                                        "export one with jest_stream.export_reference")
        self._engine_kwargs = dict(cache_bytes=cache_bytes, cache_file=cache_file,
                                   intra_op_threads=intra_op_threads, providers=providers)
        self._engine: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self._models: dict[str, ModelSpec] | None = None
        self._known = KeyMemory(1 << 20)

    def __repr__(self) -> str:
        return f"LocalScorer({self._paths!r})"

    @property
    def engine(self) -> Any:
        """The ScoringEngine, created on first use in this process."""
        with self._lock:
            if self._engine is None or self._pid != os.getpid():
                from jest_stream.server.engine import ScoringEngine  # onnxruntime only here

                self._engine = ScoringEngine(self._paths, **self._engine_kwargs)
                self._pid = os.getpid()
                self._models = None
                self._known = KeyMemory(1 << 20)
            return self._engine

    def models(self) -> dict[str, ModelSpec]:
        engine = self.engine
        if self._models is None:
            self._models = {info.name: _spec_from_engine(info) for info in engine.list_models()}
        return self._models

    def prefetch(self, model: str, job_id: str, keys: Sequence[str], inputs: InputsFn) -> None:
        return None

    def select(self, call: SelectCall, prefetched: Any = None) -> SelectOutcome:
        engine = self.engine
        keys = list(call.keys) if call.keys else None
        # Keys this engine has cached need no inputs (nor their conversion and checks).
        omit = keys is not None and call.inputs is not None and self._known.has_all(call.model, keys)
        inputs = None if omit or call.inputs is None else call.inputs()  # the caller's errors stay its own
        try:
            try:
                result = self._select(engine, call, keys, inputs)
            except ValueError:
                if not omit:
                    raise
                self._known.forget(call.model)  # evicted: run again with the inputs
                result = self._select(engine, call, keys, call.inputs())
        except (ValueError, KeyError) as exc:
            raise ScorerRejected(f"local scorer refused the request: {exc}") from exc
        except Exception as exc:  # ORT runtime failures and the like: the fallback's case
            raise ScorerUnavailable(f"local scorer failed: {type(exc).__name__}: {exc}") from exc
        if keys:
            self._known.add(call.model, keys, str(result.version))
        sel = result.selection
        return SelectOutcome(np.asarray(sel.indices, dtype=np.int64), float(sel.mean_score),
                             float(sel.mean_score_all), int(result.hits), int(result.misses),
                             str(result.version))

    @staticmethod
    def _select(engine: Any, call: SelectCall, keys: list[str] | None,
                inputs: dict[str, np.ndarray] | None) -> Any:
        return engine.select(call.model, learner=call.learner, n_select=call.n_select, keys=keys,
                             inputs=inputs, score=call.score, sampler=call.sampler,
                             n_chunks=call.n_chunks, score_gain=call.score_gain, seed=call.seed,
                             job_id=call.job_id)

    def close(self) -> None:
        with self._lock:
            engine, self._engine = self._engine, None
        close = getattr(engine, "close", None)
        if callable(close):
            close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_engine=None, _pid=-1, _lock=None, _models=None, _known=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._known = KeyMemory(1 << 20)

    def __enter__(self) -> LocalScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
