"""Batch structure: the size of a super-batch, its sub-batch by index, its keys, its arrays.

Batches are whatever the user's loader yields: tensors, numpy arrays, dicts, tuples,
lists, namedtuples, nested in any way, plus per-example lists (strings such as
WebDataset's ``__key__``, ints). ``take`` indexes every batched leaf along dim 0 and
rebuilds the same structure, so the training loop sees a sub-batch exactly as if the
loader had yielded it.

A list or tuple is a *structure* (recursed into) when each of its items is itself
batched (a tensor/array with B rows, a dict, a nested structure), as ``default_collate``
makes of (x, y) samples; otherwise, if it has B items, it is *per-example* and indexed.
Strings, numbers and 0-d arrays outside per-example lists are batch-level metadata
and pass through unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

_ARRAY = (torch.Tensor, np.ndarray)


def _rows(x: Any) -> int | None:
    if isinstance(x, _ARRAY) and x.ndim >= 1:
        return int(x.shape[0])
    return None


def _is_leaf_meta(x: Any) -> bool:
    return not isinstance(x, (Mapping, list, tuple)) and _rows(x) is None


def batch_size(batch: Any) -> int:
    """B: the number of examples in ``batch``: rows of its first tensor or array, else
    the length of its first per-example list."""
    size = _find_size(batch, arrays_only=True)
    if size is None:
        size = _find_size(batch, arrays_only=False)
    if size is None:
        raise ValueError(f"batch: found no tensor, array or per-example list in a {type(batch).__name__}; "
                         "a super-batch needs at least one batched field")
    return size


def _find_size(x: Any, arrays_only: bool) -> int | None:
    rows = _rows(x)
    if rows is not None:
        return rows
    if isinstance(x, Mapping):
        x = list(x.values())
    elif not isinstance(x, (list, tuple)):
        return None
    elif x and not arrays_only and all(_is_leaf_meta(item) for item in x):
        return len(x)  # a per-example list (strings, ints)
    for item in x:
        size = _find_size(item, arrays_only)
        if size is not None:
            return size
    return None


def batch_size_or_none(x: Any) -> int | None:
    """B of ``x``, or None when it holds nothing batched."""
    size = _find_size(x, arrays_only=True)
    return _find_size(x, arrays_only=False) if size is None else size


def _is_structure(seq: Sequence, size: int) -> bool:
    """True if every item of ``seq`` is batched with ``size`` rows (recurse into it)."""
    if not seq:
        return False
    for item in seq:
        if isinstance(item, _ARRAY):
            if _rows(item) != size:
                return False
        elif isinstance(item, Mapping):
            if batch_size_or_none(item) != size:
                return False
        elif isinstance(item, (list, tuple)):
            if not (_is_structure(item, size) or len(item) == size):
                return False
        else:
            return False
    return True


class _Indexer:
    """Indices as numpy and, per device, as torch (built once per call of ``take``)."""

    def __init__(self, indices: np.ndarray):
        self.numpy = indices
        self._torch: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        t = self._torch.get(device)
        if t is None:
            t = torch.from_numpy(self.numpy).to(device)
            self._torch[device] = t
        return t


def take(batch: Any, indices: Sequence[int] | np.ndarray, size: int | None = None) -> Any:
    """The sub-batch of ``batch`` at ``indices`` (in that order), same structure and types."""
    size = batch_size(batch) if size is None else size
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= size)):
        raise ValueError(f"indices: expected a 1-D array of indices in [0, {size}), got {idx!r}")
    return _take(batch, _Indexer(idx), size, "batch")


def _take(x: Any, idx: _Indexer, size: int, path: str) -> Any:
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            return x
        if x.shape[0] != size:
            raise ValueError(f"{path}: has {x.shape[0]} rows but the super-batch has {size}; every "
                             "batched field must have B rows along dim 0")
        return x.index_select(0, idx.on(x.device))
    if isinstance(x, np.ndarray):
        if x.ndim == 0:
            return x
        if x.shape[0] != size:
            raise ValueError(f"{path}: has {x.shape[0]} rows but the super-batch has {size}; every "
                             "batched field must have B rows along dim 0")
        return x[idx.numpy]
    if isinstance(x, Mapping):
        items = {k: _take(v, idx, size, f"{path}[{k!r}]") for k, v in x.items()}
        return _rebuild_mapping(x, items)
    if isinstance(x, (list, tuple)):
        if _is_structure(x, size):
            items = [_take(v, idx, size, f"{path}[{i}]") for i, v in enumerate(x)]
        elif len(x) == size:
            items = [x[i] for i in idx.numpy]
        elif all(_is_leaf_meta(v) for v in x):
            return x  # batch-level metadata (e.g. a list of class names)
        else:
            raise ValueError(f"{path}: a {type(x).__name__} of {len(x)} items is neither per-example "
                             f"(B={size} items) nor a structure of batched fields")
        return _rebuild_sequence(x, items)
    return x


def _rebuild_mapping(original: Mapping, items: dict) -> Mapping:
    if type(original) is dict:
        return items
    try:
        return type(original)(items)
    except TypeError:
        return items


def _rebuild_sequence(original: Sequence, items: list) -> Sequence:
    if isinstance(original, tuple) and hasattr(original, "_fields"):  # namedtuple
        return type(original)(*items)
    if type(original) in (list, tuple):
        return type(original)(items)
    try:
        return type(original)(items)
    except TypeError:
        return items


KeyFn = Callable[[Any], Sequence[Any]]


def keys_of(batch: Any, key: str | KeyFn | None, size: int) -> list[str] | None:
    """The B sample keys of ``batch`` as strings, or None without keys.

    ``key`` is a field name of a dict batch (``"__key__"`` for WebDataset) or a
    function of the batch. The default field missing from the batch means no keys;
    any other missing field is an error naming it.
    """
    if key is None:
        return None
    if callable(key):
        raw = key(batch)
        where = "key(batch)"
    else:
        if not isinstance(batch, Mapping) or key not in batch:
            if key == "__key__":
                return None
            raise KeyError(f"key: the batch has no field {key!r}; pass key=<field name>, a "
                           "function batch -> keys, or key=None to run without the reference cache")
        raw = batch[key]
        where = f"batch[{key!r}]"
    keys = _as_strings(raw, where)
    if len(keys) != size:
        raise ValueError(f"{where}: {len(keys)} keys for a super-batch of B={size}; one key per example")
    return keys


def _as_strings(raw: Any, where: str) -> list[str]:
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1:
            raise ValueError(f"{where}: keys must be 1-D, got shape {raw.shape}")
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ValueError(f"{where}: expected a sequence of keys, got {type(raw).__name__}")
    keys = list(raw)
    if set(map(type, keys)) <= {str}:
        return keys
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


def to_numpy(x: Any, dtype: np.dtype | None = None, field: str = "input") -> np.ndarray:
    """A batched field as a C-contiguous numpy array (of ``dtype`` if given)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{field}: cannot be made an array ({exc})") from None
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return np.ascontiguousarray(arr)


def fields_by_name(batch: Any, names: Sequence[str]) -> dict[str, Any]:
    """The default reference inputs: dict fields named like the model inputs, or,
    for a tuple/list batch with one item per input, its items in input order."""
    if isinstance(batch, Mapping):
        missing = [n for n in names if n not in batch]
        if missing:
            raise KeyError(f"reference_inputs: the batch has no field(s) {missing} for model inputs "
                           f"{list(names)} (it has {list(batch)}); pass reference_inputs=fn(batch) -> "
                           "{input name: array}")
        return {n: batch[n] for n in names}
    if isinstance(batch, (list, tuple)) and len(batch) == len(names):
        return dict(zip(names, batch))
    raise ValueError(f"reference_inputs: cannot map a {type(batch).__name__} batch onto model inputs "
                     f"{list(names)}; yield dicts with those fields, tuples with one item per input in "
                     "that order, or pass reference_inputs=fn(batch) -> {input name: array}")
