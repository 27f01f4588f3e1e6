"""LocalScorer: the embedded scorer, the server's ScoringEngine in this process.

ONNX Runtime is imported only here (and only when the engine starts), so a trainer
that talks to a shared scorer never needs it.

Threads: the embedded scorer runs beside torch, which already keeps a thread per core
busy. Left at their defaults, ONNX Runtime's intra-op pool and numpy's BLAS (the
selection's matrix products) each start one thread per core too and fight torch for
them: a Select that takes under a millisecond idle can take tens of milliseconds
inside a training loop. So a LocalScorer bounds both: ``intra_op_threads`` defaults to
``cores // torch.get_num_threads()`` (1 when torch uses every core) and
``blas_threads`` (applied with threadpoolctl around each Select) to 1.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jest_stream.client.learner import on_host
from jest_stream.client.scorer import (InputsFn, KeyMemory, ReferenceOutputs, ScorerRejected, ScorerUnavailable,
                                       SelectCall, memory_name)
from jest_stream.contract import ModelSpec
from jest_stream.selection import Selection


def default_intra_op_threads() -> int:
    """ONNX Runtime threads beside torch: the cores torch leaves (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))


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
                 intra_op_threads: int | None = None, blas_threads: int = 1,
                 providers: Sequence[str] | None = None):
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
        if intra_op_threads is None:
            intra_op_threads = default_intra_op_threads()
        for field, value in (("intra_op_threads", intra_op_threads), ("blas_threads", blas_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: expected an integer >= 1, got {value!r}")
        self.intra_op_threads, self.blas_threads = intra_op_threads, blas_threads
        self._engine_kwargs = dict(cache_bytes=cache_bytes, cache_file=cache_file,
                                   intra_op_threads=intra_op_threads, providers=providers)
        self._blas: Any = None
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
                from jest_stream.extras import require

                require("onnxruntime", "LocalScorer (the embedded scorer)", "local")
                from jest_stream.server.engine import ScoringEngine  # onnxruntime only here

                self._engine = ScoringEngine(self._paths, **self._engine_kwargs)
                self._pid = os.getpid()
                self._models = None
                self._known = KeyMemory(1 << 20)
            return self._engine

    def models(self) -> dict[str, ModelSpec]:
        engine = self.engine
        if self._models is None:
            self._models = {spec.name: spec for spec in engine.list_models()}
        return self._models

    def prefetch(self, model: str, job_id: str, keys: Sequence[str], inputs: InputsFn,
                 outputs: bool = False, dataset: str = "") -> None:
        return None

    def blas_limit(self) -> Any:
        """A context that holds numpy's BLAS to ``blas_threads`` threads (threadpoolctl)."""
        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        return self._blas.limit(limits=self.blas_threads, user_api="blas")

    def _cached_call(self, model: str, dataset: str, job_id: str, keys: list[str] | None,
                     inputs: InputsFn | None, run: Callable[[dict[str, np.ndarray] | None, str], Any]) -> Any:
        """``run(inputs, namespace)``, without the inputs when this engine has cached every key of
        the request's cache namespace (and again with them if they were evicted); engine errors
        become scorer errors."""
        from jest_stream.server.engine import NotCached as EngineNotCached
        from jest_stream.server.names import check_name, namespace

        try:
            space = namespace(check_name(dataset, "dataset"), job_id)
        except ValueError as exc:
            raise ScorerRejected(f"local scorer refused the request: {exc}") from exc
        known = memory_name(model, dataset, job_id)
        # Keys this engine has cached need no inputs (nor their conversion and checks).
        omit = keys is not None and inputs is not None and self._known.has_all(known, keys)
        given = None if omit or inputs is None else inputs()  # the caller's errors stay its own
        try:
            try:
                result = run(given, space)
            except EngineNotCached:
                if not omit:
                    raise
                self._known.forget(known)  # evicted: run again with the inputs
                result = run(inputs(), space)
        except (ValueError, KeyError) as exc:
            raise ScorerRejected(f"local scorer refused the request: {exc}") from exc
        except Exception as exc:  # ORT runtime failures and the like: the fallback's case
            raise ScorerUnavailable(f"local scorer failed: {type(exc).__name__}: {exc}") from exc
        if keys:
            version = result.model_version if isinstance(result, Selection) else result.version
            self._known.add(known, keys, version)
        return result

    def select(self, call: SelectCall, prefetched: Any = None) -> Selection:
        engine = self.engine
        keys = list(call.keys) if call.keys else None
        learner = on_host(call.learner)  # scorer-side selection runs on the host
        with self.blas_limit():
            return self._cached_call(call.model, call.dataset, call.job_id, keys, call.inputs,
                                     lambda inputs, space: engine.select(
                                         call.model, learner=learner, n_select=call.n_select, keys=keys,
                                         inputs=inputs, options=call.options, seed=call.seed, dataset=space))

    def reference(self, model: str, job_id: str, keys: Sequence[str] | None, inputs: InputsFn | None,
                  prefetched: Any = None, dataset: str = "") -> ReferenceOutputs:
        """The reference outputs of a super-batch, from this engine's cache or its model."""
        engine = self.engine
        keys = list(keys) if keys else None
        result = self._cached_call(model, dataset, job_id, keys, inputs, lambda given, space: engine.reference(
            model, keys, given, dataset=space))
        return ReferenceOutputs(result.outputs, result.hits, result.misses, result.version)

    def close(self) -> None:
        with self._lock:
            engine, self._engine = self._engine, None
        close = getattr(engine, "close", None)
        if callable(close):
            close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_engine=None, _pid=-1, _lock=None, _models=None, _known=None, _blas=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._known = KeyMemory(1 << 20)

    def __enter__(self) -> LocalScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
