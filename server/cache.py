"""The reference cache: (model version, dataset, sample key) -> that sample's reference
outputs, least-recently-used entries evicted first under a byte budget.

Reference models are frozen, so an entry never goes stale; a new model file gets a new
version and new entries. Keys are unique only within a dataset, so each (version,
dataset) namespace has its own entries. Entries live in slabs, one per namespace: one array per
output with a row per entry, and a dict key -> row. A super-batch of B keys is then
one dict lookup per key and one fancy-indexed gather per output, not B small arrays
(the hit path must cost little beside the RPC that carries it).

Recency is counted per operation: every key touched by one lookup or insert shares a
tick, so the order is exact LRU at request granularity (equal ticks: lower row first).
Each operation also appends (tick, rows) to a queue, oldest first; an entry belongs to
the group of its latest tick, and groups whose rows were touched again since are stale.
Eviction pops groups off the front, so it costs the entries it drops, not a scan or a
sort of the whole cache; an insert into a full cache evicts just what it needs, so the
work is spread evenly over inserts (no long pause every so often).
"""
from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import repeat

import numpy as np

# Bytes charged per entry on top of its output rows and its key's str object (as
# sys.getsizeof counts it: a 4-byte emoji is 4 bytes, not 1): the dict slot and the
# bookkeeping arrays (ticks, sizes, keys, free stack), rounded up.
ENTRY_OVERHEAD = 120
_MIN_CAPACITY = 64


class _Slab:
    """Storage of one model version: arrays with a row per entry, and key -> row."""

    def __init__(self, outputs: Mapping[str, np.ndarray]):
        # outputs: name -> (n, *row_shape) array; fixes the dtypes and row shapes
        self.specs = {name: (value.dtype, value.shape[1:]) for name, value in outputs.items()}
        self.row_bytes = sum(dt.itemsize * int(np.prod(shape, dtype=np.int64))
                             for dt, shape in self.specs.values())
        self.capacity = 0
        self.arrays = {name: np.empty((0, *shape), dt) for name, (dt, shape) in self.specs.items()}
        self.ticks = np.empty(0, np.int64)       # last use; -1 for a free row
        self.sizes = np.empty(0, np.int64)       # bytes charged for the row's entry
        self.keys = np.empty(0, object)          # row -> key
        self.index: dict[str, int] = {}
        self.free = np.empty(0, np.int64)        # a stack of free rows: the top is handed out first
        self.n_free = 0

    def grow(self, need: int) -> None:
        """Make room for ``need`` more entries (capacity doubles)."""
        if self.n_free >= need:
            return
        new_cap = max(_MIN_CAPACITY, self.capacity * 2, self.capacity + need - self.n_free)
        extra = new_cap - self.capacity
        for name, (dt, shape) in self.specs.items():
            grown = np.empty((new_cap, *shape), dt)
            grown[:self.capacity] = self.arrays[name]
            self.arrays[name] = grown
        self.ticks = np.concatenate([self.ticks, np.full(extra, -1, np.int64)])
        self.sizes = np.concatenate([self.sizes, np.zeros(extra, np.int64)])
        self.keys = np.concatenate([self.keys, np.full(extra, None, object)])
        free = np.empty(new_cap, np.int64)
        free[:self.n_free] = self.free[:self.n_free]
        free[self.n_free:self.n_free + extra] = np.arange(new_cap - 1, self.capacity - 1, -1)  # low rows on top
        self.free, self.n_free = free, self.n_free + extra
        self.capacity = new_cap

    def take(self, n: int) -> np.ndarray:
        """``n`` free rows off the top of the stack (call ``grow(n)`` first)."""
        rows = self.free[self.n_free - n:self.n_free][::-1].copy()
        self.n_free -= n
        return rows

    def release(self, rows: np.ndarray) -> None:
        """Free ``rows`` (distinct, in use); the last released are handed out first."""
        self.ticks[rows] = -1
        self.sizes[rows] = 0
        self.keys[rows] = None
        self.free[self.n_free:self.n_free + rows.size] = rows
        self.n_free += rows.size

    def check(self, outputs: Mapping[str, np.ndarray], field: str) -> dict[str, np.ndarray]:
        if set(outputs) != set(self.specs):
            raise ValueError(f"{field}: outputs {sorted(outputs)} do not match the cached outputs "
                             f"{sorted(self.specs)} of this model version")
        out = {}
        for name, (dt, shape) in self.specs.items():
            value = np.asarray(outputs[name])
            if value.shape[1:] != shape:
                raise ValueError(f"{field}[{name!r}]: rows of shape {list(value.shape[1:])}, the cache "
                                 f"holds rows of shape {list(shape)} for this model version")
            out[name] = value.astype(dt, copy=False)
        return out


class ReferenceCache:
    """Thread-safe LRU map (version, dataset, key) -> {output name: one sample's row}, bounded
    in the bytes it really holds."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache_bytes: must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.evictions = 0
        self._slabs: dict[tuple[str, str], _Slab] = {}
        self._tick = 0
        self._lock = threading.Lock()
        # (tick, slab, rows used at that tick), oldest first; rows held, for compaction
        self._recency: deque[tuple[int, _Slab, np.ndarray]] = deque()
        self._recency_rows = 0

    def __len__(self) -> int:
        return sum(len(s.index) for s in self._slabs.values())

    def entries_by_dataset(self, version: str) -> dict[str, int]:
        """Entries held for model ``version``, by dataset."""
        with self._lock:
            return {ds: len(slab.index) for (v, ds), slab in self._slabs.items() if v == version and slab.index}

    def get(self, version: str, keys: Sequence[str],
            dataset: str = "") -> tuple[dict[str, np.ndarray] | None, np.ndarray]:
        """Look up a super-batch of keys of ``dataset``.

        Returns ``(outputs, missing)``: ``outputs`` maps output name -> (B, ...) array whose
        rows for cached keys are filled (rows listed in ``missing`` are left unset), or
        None when no key is cached; ``missing`` holds the row indices of uncached keys.
        """
        n = len(keys)
        with self._lock:
            slab = self._slabs.get((version, dataset))
            if slab is None or not slab.index:
                return None, np.arange(n, dtype=np.int64)
            rows = np.fromiter(map(slab.index.get, keys, repeat(-1, n)), dtype=np.int64, count=n)
            hit = rows >= 0
            n_hit = int(np.count_nonzero(hit))
            if n_hit == 0:
                return None, np.arange(n, dtype=np.int64)
            self._tick += 1
            if n_hit == n:
                slab.ticks[rows] = self._tick
                self._used(slab, rows)
                return {name: arr[rows] for name, arr in slab.arrays.items()}, np.empty(0, np.int64)
            hit_rows = rows[hit]
            slab.ticks[hit_rows] = self._tick
            self._used(slab, hit_rows)
            outputs = {}
            for name, arr in slab.arrays.items():
                out = np.empty((n, *arr.shape[1:]), arr.dtype)
                out[hit] = arr[hit_rows]
                outputs[name] = out
            return outputs, np.flatnonzero(~hit)

    def put_batch(self, version: str, keys: Sequence[str], outputs: Mapping[str, np.ndarray],
                  dataset: str = "") -> None:
        """Insert a batch of ``dataset``: row i of every output belongs to ``keys[i]`` (values
        are copied)."""
        n = len(keys)
        if n == 0:
            return
        for name, value in outputs.items():
            if np.shape(value)[:1] != (n,):
                raise ValueError(f"outputs[{name!r}]: {np.shape(value)[:1]} rows for {n} keys")
        with self._lock:
            slab = self._slabs.get((version, dataset))
            if slab is None:
                slab = self._slabs[(version, dataset)] = _Slab({k: np.asarray(v) for k, v in outputs.items()})
            values = slab.check(outputs, "outputs")
            # each entry is charged what it holds: its rows, its key's str object, the overhead
            size = np.fromiter(map(sys.getsizeof, keys), dtype=np.int64, count=n)
            size += slab.row_bytes + ENTRY_OVERHEAD
            total = int(size.sum())
            if total > self.max_bytes:
                # a batch larger than the whole budget: keep the tail of it that fits
                tail = np.cumsum(size[::-1])
                keep = int(np.searchsorted(tail, self.max_bytes, side="right"))
                if keep == 0:
                    return
                keys = list(keys)[n - keep:]
                values = {k: v[n - keep:] for k, v in values.items()}
                size = size[n - keep:]
                n = keep
                total = int(size.sum())
            self._tick += 1
            need = self.bytes + total - self.max_bytes
            if need > 0:
                self._evict(need)
            slab.grow(n)
            rows = slab.take(n)
            for name, value in values.items():
                slab.arrays[name][rows] = value
            slab.ticks[rows] = self._tick
            self._used(slab, rows)
            slab.sizes[rows] = size
            keys = keys if isinstance(keys, list) else list(keys)
            slab.keys[rows] = keys
            row_list = rows.tolist()
            # one pass inserts the new keys and says which were there already
            had = np.fromiter(map(slab.index.setdefault, keys, row_list), dtype=np.int64, count=n)
            self.bytes += total
            clash = np.flatnonzero(had != rows)
            if clash.size:
                # keys cached already (two requests raced to fill them) or given twice:
                # the new (last) row wins, and the rows no longer pointed to are freed
                for i in clash.tolist():
                    slab.index[keys[i]] = row_list[i]
                self._drop_orphans(slab, np.unique(np.concatenate([had[clash], rows[clash]])))

    def _drop_orphans(self, slab: _Slab, candidates: np.ndarray) -> None:
        """Free those of the (distinct) ``candidates`` rows that the index no longer points to."""
        pointed = np.fromiter(map(slab.index.get, slab.keys[candidates], repeat(-1, candidates.size)),
                              dtype=np.int64, count=candidates.size)
        orphans = candidates[pointed != candidates]
        self.bytes -= int(slab.sizes[orphans].sum())
        slab.release(orphans)

    def _used(self, slab: _Slab, rows: np.ndarray) -> None:
        """Queue the rows given the current tick (lock held); drop stale rows from the
        queue once it holds more than twice the entries, so that it stays O(entries)."""
        self._recency.append((self._tick, slab, rows))
        self._recency_rows += rows.size
        if self._recency_rows > 2 * len(self) + 4096:
            groups, self._recency = self._recency, deque()
            self._recency_rows = 0
            for tick, owner, held in groups:
                live = held[owner.ticks[held] == tick]
                if live.size:
                    self._recency.append((tick, owner, live))
                    self._recency_rows += live.size

    def _evict(self, nbytes: int) -> None:
        """Drop the least recently used entries until ``nbytes`` are freed (lock held)."""
        freed = 0
        while freed < nbytes and self._recency:
            tick, slab, held = self._recency.popleft()
            self._recency_rows -= held.size
            rows = np.unique(held[slab.ticks[held] == tick])  # still last used at this tick
            if not rows.size:
                continue
            held_bytes = np.cumsum(slab.sizes[rows])
            if freed + int(held_bytes[-1]) > nbytes:  # only part of this group is needed
                k = int(np.searchsorted(held_bytes, nbytes - freed)) + 1
                self._recency.appendleft((tick, slab, rows[k:]))
                self._recency_rows += rows.size - k
                rows = rows[:k]
            dropped = int(held_bytes[rows.size - 1])
            freed += dropped
            index = slab.index
            for key in slab.keys[rows]:
                del index[key]
            self.bytes -= dropped
            self.evictions += int(rows.size)
            slab.release(rows)
