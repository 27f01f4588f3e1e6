"""LocalScorer: the embedded scorer, the server's ScoringEngine in this process.

ONNX Runtime is imported only here (and only when the engine starts), so a trainer
that talks to a shared scorer never needs it.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jest_stream.client.scorer import InputsFn, KeyMemory, ScorerRejected, ScorerUnavailable, SelectCall
from jest_stream.contract import ModelSpec
from jest_stream.selection import Selection


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
            self._models = {spec.name: spec for spec in engine.list_models()}
        return self._models

    def prefetch(self, model: str, job_id: str, keys: Sequence[str], inputs: InputsFn,
                 dataset: str = "") -> None:
        return None

    def select(self, call: SelectCall, prefetched: Any = None) -> Selection:
        engine = self.engine
        from jest_stream.server.engine import NotCached as EngineNotCached
        from jest_stream.server.names import check_name, namespace

        keys = list(call.keys) if call.keys else None
        dataset = namespace(check_name(call.dataset, "dataset"), call.job_id)
        known = f"{call.model}\0{dataset}"
        # Keys this engine has cached need no inputs (nor their conversion and checks).
        omit = keys is not None and call.inputs is not None and self._known.has_all(known, keys)
        inputs = None if omit or call.inputs is None else call.inputs()  # the caller's errors stay its own
        try:
            try:
                result = self._select(engine, call, keys, inputs, dataset)
            except EngineNotCached:
                if not omit:
                    raise
                self._known.forget(known)  # evicted: run again with the inputs
                result = self._select(engine, call, keys, call.inputs(), dataset)
        except (ValueError, KeyError) as exc:
            raise ScorerRejected(f"local scorer refused the request: {exc}") from exc
        except Exception as exc:  # ORT runtime failures and the like: the fallback's case
            raise ScorerUnavailable(f"local scorer failed: {type(exc).__name__}: {exc}") from exc
        if keys:
            self._known.add(known, keys, result.model_version)
        return result

    @staticmethod
    def _select(engine: Any, call: SelectCall, keys: list[str] | None,
                inputs: dict[str, np.ndarray] | None, dataset: str) -> Any:
        return engine.select(call.model, learner=call.learner, n_select=call.n_select, keys=keys,
                             inputs=inputs, options=call.options, seed=call.seed, dataset=dataset)

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
