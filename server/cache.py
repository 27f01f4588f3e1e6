"""The reference cache: a thread-safe LRU of per-sample reference outputs under a byte budget.

Keys are (model version, sample key): reference models are frozen, so an entry never
goes stale; a new model file gets a new version and new entries.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

Entry = dict[str, np.ndarray]


def _entry_bytes(entry: Mapping[str, np.ndarray], key: tuple[str, str]) -> int:
    return sum(v.nbytes for v in entry.values()) + len(key[0]) + len(key[1]) + 64


class ReferenceCache:
    """LRU map (version, key) -> {output name: one sample's array}, bounded in bytes."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache_bytes: must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._data: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, version: str, keys: Sequence[str]) -> list[Entry | None]:
        """The entries of ``keys`` (None where missing), refreshing their recency."""
        out: list[Entry | None] = []
        with self._lock:
            for key in keys:
                entry = self._data.get((version, key))
                if entry is not None:
                    self._data.move_to_end((version, key))
                out.append(entry)
        return out

    def put(self, version: str, key: str, entry: Mapping[str, np.ndarray]) -> None:
        """Insert one sample's outputs (copied, so request buffers are not kept alive)."""
        item = {name: np.array(value, copy=True) for name, value in entry.items()}
        ckey = (version, key)
        size = _entry_bytes(item, ckey)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(ckey, None)
            if old is not None:
                self.bytes -= _entry_bytes(old, ckey)
            self._data[ckey] = item
            self.bytes += size
            while self.bytes > self.max_bytes and self._data:
                k, v = self._data.popitem(last=False)
                self.bytes -= _entry_bytes(v, k)
                self.evictions += 1

    def put_batch(self, version: str, keys: Sequence[str], outputs: Mapping[str, np.ndarray]) -> None:
        """Insert a batch: row i of every output belongs to keys[i]."""
        for i, key in enumerate(keys):
            self.put(version, key, {name: value[i] for name, value in outputs.items()})
