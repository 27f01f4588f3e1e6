"""Loading a precomputed reference cache file into the cache: records checked against the
model, non-finite ones skipped, everything under the file's dataset."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

import numpy as np

from jest_stream.cachefile import CacheFileError, read_cache_file

from .cache import ReferenceCache
from .models import ReferenceModel
from .names import is_valid_name, shown

log = logging.getLogger(__name__)

_LOAD_CHUNK = 4096  # cache-file records inserted per batch


def nonfinite_rows(outputs: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Indices of the rows (of ``n``) where any output holds NaN or inf."""
    bad = np.zeros(n, dtype=bool)
    for value in outputs.values():
        arr = np.asarray(value)
        if arr.dtype.kind in "fc":
            bad |= ~np.isfinite(arr.reshape(n, -1)).all(axis=1)
    return np.flatnonzero(bad)


class CacheFileLoad:
    """Records of one cache file going into the cache in batches, checked against the model."""

    def __init__(self, cache: ReferenceCache, model: ReferenceModel, path: str, dataset: str):
        self.cache, self.model, self.path, self.dataset = cache, model, path, dataset
        self.specs = {s.name: s for s in model.outputs}
        self.keys: list[str] = []
        self.rows: list[dict[str, np.ndarray]] = []
        self.n = 0
        self.nonfinite = 0

    def add(self, key: str, outputs: dict[str, np.ndarray]) -> None:
        missing = [o for o in self.model.contract.outputs if o not in outputs]
        if missing:
            raise CacheFileError(f"{self.path}: record {shown(key)} lacks output(s) {missing} of model "
                                 f"{self.model.name!r}; it has {sorted(outputs)}")
        if nonfinite_rows({k: v[None] for k, v in outputs.items()}, 1).size:
            self.nonfinite += 1
            return
        self.keys.append(key)
        self.rows.append(outputs)
        self.n += 1
        if len(self.keys) >= _LOAD_CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        outputs = {}
        for name in self.model.contract.outputs:
            want = self.specs[name].shape[1:]
            try:
                stacked = np.stack([r[name] for r in self.rows])
            except ValueError:
                raise CacheFileError(f"{self.path}: records near {shown(self.keys[0])} give output {name!r} "
                                     f"rows of different shapes; model {self.model.name!r} gives "
                                     f"{list(want)}") from None
            if stacked.ndim - 1 != len(want) or any(w not in (-1, g) for w, g in zip(want, stacked.shape[1:])):
                raise CacheFileError(f"{self.path}: record {shown(self.keys[0])} output {name!r} has row shape "
                                     f"{list(stacked.shape[1:])}; model {self.model.name!r} gives {list(want)}")
            outputs[name] = stacked.astype(self.specs[name].dtype, copy=False)
        self.cache.put_batch(self.model.version, self.keys, outputs, self.dataset)
        self.keys, self.rows = [], []


def load_cache_file(cache: ReferenceCache, models: Iterable[ReferenceModel], path: str | os.PathLike) -> int:
    """Load a precomputed cache file into the cache (under the file's dataset); returns
    the records loaded.

    A file for a model version that no loaded model has is skipped with a warning
    (an old precompute); one whose outputs do not fit the model raises CacheFileError.
    Records with non-finite outputs are skipped (counted in a warning), never cached.
    """
    version, records = read_cache_file(path)
    models = list(models)
    model = next((m for m in models if m.version == version), None)
    if model is None:
        log.warning("cache file %s is for model version %s, which no loaded model has (%s); skipped",
                    path, version, ", ".join(f"{m.name}={m.version}" for m in models))
        records.close()
        return 0
    if not is_valid_name(records.dataset):
        records.close()
        raise CacheFileError(f"{path}: dataset {shown(records.dataset)} is not a valid name (at most "
                             "128 printable ASCII characters)")
    loaded = CacheFileLoad(cache, model, os.fspath(path), records.dataset)
    with records:
        for key, outputs in records:
            loaded.add(key, outputs)
        loaded.flush()
    if loaded.nonfinite:
        log.warning("cache file %s: %d record(s) hold non-finite outputs; skipped", path, loaded.nonfinite)
    log.info("loaded %d reference records of dataset %s from %s into model %s (version %s); cache holds "
             "%d entries, %d bytes", loaded.n, records.dataset, path, model.name, version, len(cache),
             cache.bytes)
    if cache.evictions:
        log.warning("the cache budget (--cache-bytes %d) is smaller than the cache file(s): %d entries "
                    "were evicted at load", cache.max_bytes, cache.evictions)
    return loaded.n
