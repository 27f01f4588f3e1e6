"""One step's pieces: a fetched super-batch, its sub-batch size b, its seed, and the
breaker that skips a failing scorer for a while."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np



def step_seed(seed: int, rank: int, step: int) -> int:
    """The sampler seed of one step of one rank: SeedSequence(seed, spawn_key=(rank, step))."""
    state = np.random.SeedSequence(seed, spawn_key=(rank, step)).generate_state(1, np.uint64)
    return int(state[0])


def sub_batch_size(size: int, largest: int, n_select: int | None, filter_ratio: float) -> int:
    """b for a super-batch of ``size`` examples: ``n_select`` or (1 - filter_ratio) * B.

    A b that selects nothing (b >= B) is a configuration error and raises, naming both
    numbers; only a super-batch shorter than the largest seen so far (an epoch's last,
    with ``drop_last=False``) may be smaller than ``n_select``, and is then kept whole.
    """
    b = n_select if n_select is not None else max(1, int(round((1.0 - filter_ratio) * size)))
    if b < size or size < largest:
        return min(b, size)
    what = (f"n_select={n_select}" if n_select is not None
            else f"filter_ratio={filter_ratio:g} keeps b={b}")
    raise ValueError(f"{what} of a super-batch of B={size} examples: nothing would be selected; "
                     f"use super-batches larger than b (batch_size > {b}) or a smaller b")


class SuperBatch:
    """A fetched super-batch: the batch, its size, keys, lazily built reference
    inputs and the handle of its reference prefetch."""

    __slots__ = ("batch", "size", "keys", "prefetched", "prefetch_error", "_inputs", "_make_inputs")

    def __init__(self, batch: Any, size: int, keys: list[str] | None,
                 make_inputs: Callable[[Any], dict[str, np.ndarray]]):
        self.batch, self.size, self.keys = batch, size, keys
        self.prefetched: Any = None
        self.prefetch_error: str | None = None
        self._inputs: dict[str, np.ndarray] | None = None
        self._make_inputs = make_inputs

    def inputs(self) -> dict[str, np.ndarray]:
        if self._inputs is None:
            self._inputs = self._make_inputs(self.batch)
        return self._inputs


class Breaker:
    """After a scorer failure, skip the scorer for ``retry_after`` seconds (each skip
    is a counted fallback), then try it again: a dead scorer costs one timed-out or
    refused call per ``retry_after`` seconds, not one per step."""

    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        self.until = 0.0
        self.error = ""

    def is_open(self) -> bool:
        return time.monotonic() < self.until

    def trip(self, error: Exception) -> None:
        self.until = time.monotonic() + self.retry_after
        self.error = str(error)

    def reset(self) -> None:
        self.until = 0.0

