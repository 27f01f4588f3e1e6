"""What exact resume needs from the wrapped loader: its epoch, its shuffle order, its state.

A DataLoader with ``shuffle=True`` draws its permutation from its sampler's generator
(or from torch's global RNG when it has none) when an epoch starts. A restarted
script builds a fresh loader whose generator replays epoch 0's permutation, and the
exact draws depend on the loader's internals (torch's RandomSampler draws once more
at the end of an epoch, torchdata's StatefulDataLoader restores its generator its own
way). So the JESTLoader owns the order: each shuffling sampler it finds
(``RandomSampler``, ``SubsetRandomSampler``, ``WeightedRandomSampler``, torchdata's)
is given a ``torch.Generator`` of its own, seeded from (JESTLoader seed, epoch) at the
start of each epoch. Epoch e's order is then the same in every run with that seed,
resumed or not, on every rank. The user's own generator object is never touched (the
DataLoader still draws its workers' base seed from it), and torch's global RNG is no
longer consumed by the sampler.

Each epoch's number is passed on with ``set_epoch`` (DistributedSampler, accelerate's
loaders, HF datasets), and a wrapped loader's own ``state_dict`` is used only if
calling it works (accelerate's default DataLoaderShard has one that raises).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: SeedSequence(seed, spawn_key=(1 << 20, epoch)), 63 bits."""
    state = np.random.SeedSequence(seed, spawn_key=(1 << 20, epoch)).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def samplers_of(loader: Any) -> list[Any]:
    """The samplers under a loader: ``.sampler``, ``.batch_sampler`` and what they wrap
    (accelerate's BatchSamplerShard wraps a BatchSampler wrapping the sampler)."""
    found: dict[int, Any] = {}
    queue = [getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    while queue:
        item = queue.pop(0)
        if item is None or isinstance(item, (str, bytes)) or id(item) in found or len(found) > 8:
            continue
        found[id(item)] = item
        queue += [getattr(item, "sampler", None), getattr(item, "batch_sampler", None)]
    return list(found.values())


def forward_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader if it has one (accelerate), else on its
    samplers (DistributedSampler) and its dataset (HF datasets)."""
    own = getattr(loader, "set_epoch", None)
    if callable(own):
        own(epoch)
        return
    targets = samplers_of(loader) + [getattr(loader, "dataset", None)]
    for target in targets:
        set_epoch = getattr(target, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def working_state_dict(loader: Any) -> Callable[[], Any] | None:
    """The loader's ``state_dict`` if it has one with a ``load_state_dict`` and calling it
    works; None otherwise (plain DataLoader, accelerate's loader without
    ``use_stateful_dataloader=True``, whose state_dict raises)."""
    save, load = getattr(loader, "state_dict", None), getattr(loader, "load_state_dict", None)
    if not (callable(save) and callable(load)):
        return None
    try:
        save()
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable
        log.debug("the wrapped loader's state_dict does not work (%s: %s); resume replays instead",
                  type(exc).__name__, exc)
        return None
    return save


class EpochOrder:
    """Makes the wrapped loader's shuffle order a function of (seed, epoch): call
    ``begin(epoch)`` right before each ``iter(loader)``."""

    def __init__(self, loader: Any, seed: int):
        self._loader = loader
        self.seed = seed
        self._own: dict[int, torch.Generator] = {}  # sampler id -> the generator given to it

    def shufflers(self) -> list[Any]:
        """The samplers that draw an order from a torch.Generator (or would, from torch's RNG)."""
        return [s for s in samplers_of(self._loader) if hasattr(s, "generator")
                and (s.generator is None or isinstance(s.generator, torch.Generator))]

    def begin(self, epoch: int) -> None:
        """Pass the epoch on, then seed each shuffling sampler's own generator for it."""
        forward_epoch(self._loader, epoch)
        for sampler in self.shufflers():
            mine = self._own.get(id(sampler))
            if mine is None or sampler.generator is not mine:
                mine = self._own[id(sampler)] = torch.Generator()
                sampler.generator = mine
            mine.manual_seed(epoch_seed(self.seed, epoch))


class EpochHook:
    """``loader.sampler`` as frameworks see it: ``set_epoch`` reaches the JESTLoader."""

    def __init__(self, loader: Any):
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)

    def __repr__(self) -> str:
        return f"<epoch hook of JESTLoader at epoch {self._loader.epoch}>"
