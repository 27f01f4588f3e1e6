"""Sharding a DataLoader across torch.distributed ranks for a JESTLoader.

A JESTLoader is not a DataLoader, so frameworks that shard DataLoaders for you
(Lightning's ``use_distributed_sampler``, HF Trainer's) pass it through untouched and
every rank would select from all the data. ``shard(loader)`` gives the wrapped
DataLoader the ``DistributedSampler`` those frameworks would have given it; the
JESTLoader then passes each epoch to it (``set_epoch``). The loader warns once
when it runs on several ranks around a DataLoader that nothing shards.
"""
from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from jest_stream.client.identity import distributed_rank
from jest_stream.client.resume import samplers_of

log = logging.getLogger(__name__)

# Samplers and loaders that shard by themselves (accelerate's), by class name.
_SHARDING = ("DistributedSampler", "BatchSamplerShard", "IterableDatasetShard", "DataLoaderDispatcher",
             "DistributedSamplerWrapper")


def is_sharded(loader: Any) -> bool:
    """True unless ``loader`` is a map-style DataLoader with no distributed sampler."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return True
    names = {type(loader).__name__} | {type(s).__name__ for s in samplers_of(loader)}
    return bool(names & set(_SHARDING)) or type(loader.dataset).__name__ == "IterableDatasetShard"


def warn_if_unsharded(loader: Any) -> None:
    """Warn when several ranks iterate a DataLoader that nothing shards."""
    rank, world = distributed_rank()
    if world > 1 and not is_sharded(loader):
        log.warning("rank %d of %d: the wrapped DataLoader has no DistributedSampler, so every rank "
                    "selects from all the data; wrap it as JESTLoader(shard(DataLoader(...)), ...) "
                    "(jest_stream.client.shard)", rank, world)


def shard(loader: DataLoader, *, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """``loader`` rebuilt with a DistributedSampler for this rank (shuffling if it
    shuffled, seeded by ``seed`` and the epoch), when torch.distributed runs on several
    ranks; otherwise, or if it is already sharded or iterable-style, ``loader`` itself.
    ``drop_last``: the DistributedSampler's (pad or drop to equal shards)."""
    rank, world = distributed_rank()
    if world == 1 or is_sharded(loader):
        return loader
    if type(loader.batch_sampler) is not BatchSampler:
        raise ValueError(f"loader: a custom batch_sampler ({type(loader.batch_sampler).__name__}) cannot be "
                         "sharded here; give it a DistributedSampler yourself")
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, seed=seed,
                                 shuffle=isinstance(loader.sampler, RandomSampler), drop_last=drop_last)
    kwargs: dict[str, Any] = dict(
        batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device)
    if loader.num_workers:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    return type(loader)(loader.dataset, **kwargs)
