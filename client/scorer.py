"""The Scorer interface the JESTLoader talks to, its request type and its errors.

A scorer knows reference models (``models()``), can warm its reference cache for a
super-batch ahead of time (``prefetch``), selects a sub-batch from the learner's
scores (``select``) and, for selection on the trainer, hands back the reference
outputs themselves (``reference``). Two implementations share it:

- ``LocalScorer(path)`` (client/local.py): the server's ScoringEngine in this process
  (ONNX Runtime; nothing to start), so local and remote selections are identical;
- ``RemoteScorer(target)`` (client/remote.py): the shared gRPC scoring server.

Errors split in two, and the loader's ``fallback`` policy only covers the first:
``ScorerUnavailable`` (unreachable, deadline, server failure: retrying later may
work) and ``ScorerRejected`` (bad request, unknown model, wrong token: a
configuration error that retrying will not fix).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jest_stream.contract import ModelSpec
from jest_stream.options import SelectOptions
from jest_stream.outputs import Embeddings, Losses
from jest_stream.selection import Selection

InputsFn = Callable[[], dict[str, np.ndarray]]


class ScorerError(RuntimeError):
    """The scorer did not answer a request."""


class ScorerUnavailable(ScorerError):
    """The scorer is unreachable, timed out or failed; a later call may succeed."""


class ScorerRejected(ScorerError):
    """The scorer refused the request (bad input, unknown model, authentication)."""


class NotCached(ScorerRejected):
    """The request sent keys without inputs and the scorer does not hold them all: send the
    inputs (raised on the scorer's machine-readable signal, never on a message's text)."""


@dataclass(frozen=True)
class SelectCall:
    """One super-batch's selection request. ``inputs`` is called only if the
    scorer needs the reference inputs (keys missing from its cache, or no keys).
    ``dataset`` names the dataset the keys belong to: cached reference outputs are
    shared only between calls naming the same one ("": private to this job)."""

    model: str
    job_id: str
    learner: Losses | Embeddings
    n_select: int
    keys: Sequence[str] | None = None
    inputs: InputsFn | None = None
    options: SelectOptions = SelectOptions()
    seed: int | None = None
    dataset: str = ""


@dataclass(frozen=True)
class ReferenceOutputs:
    """A super-batch's reference outputs by output name (B rows each, host arrays), the
    reference-cache figures of the call and the model version that computed them."""

    outputs: dict[str, np.ndarray]
    cache_hits: int = 0
    cache_misses: int = 0
    model_version: str = ""


@runtime_checkable
class Scorer(Protocol):
    """What the JESTLoader needs from a scorer (local or remote)."""

    def models(self) -> dict[str, ModelSpec]:
        """The reference models the scorer serves, by name."""

    def prefetch(self, model: str, job_id: str, keys: Sequence[str], inputs: InputsFn,
                 outputs: bool = False, dataset: str = "") -> Any:
        """Start warming the reference cache for these keys (of ``dataset``; with ``outputs``,
        fetching their outputs too); return a handle for ``select`` or ``reference`` (or
        None if there is nothing to wait for)."""

    def select(self, call: SelectCall, prefetched: Any = None) -> Selection:
        """Select ``call.n_select`` examples; raise ScorerUnavailable or ScorerRejected."""

    def reference(self, model: str, job_id: str, keys: Sequence[str] | None, inputs: InputsFn | None,
                  prefetched: Any = None) -> ReferenceOutputs:
        """The reference outputs of a super-batch (from ``prefetched`` when it fetched them);
        raise ScorerUnavailable or ScorerRejected."""

    def close(self) -> None:
        """Release channels, threads and sessions."""


def memory_name(model: str, dataset: str, job_id: str) -> str:
    """The KeyMemory name of a model's keys of one dataset (keys are unique only within one;
    a call naming none has its job's own, as the scorer's cache does)."""
    return f"{model}\0{dataset}" if dataset else f"{model}\0\0{job_id}"


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
