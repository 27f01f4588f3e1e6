"""PyTorch Lightning glue: selection stats to Lightning's logger.

Needs ``lightning`` (imported here only; ``import jest_stream.client`` never does).
In a LightningModule, build the loader in ``train_dataloader`` around a sharded
DataLoader (Lightning shards only DataLoaders, and a JESTLoader is not one)::

    def train_dataloader(self):
        base = shard(DataLoader(dataset, batch_size=B, shuffle=True))  # a DistributedSampler under DDP
        return JESTLoader(base, self.score, scorer, filter_ratio=0.8, seed=0)

Lightning then calls ``loader.sampler.set_epoch(e)`` each epoch (passed on to the
DistributedSampler) and saves ``loader.state_dict()`` in its checkpoints, so
``trainer.fit(model, ckpt_path=...)`` resumes mid-epoch exactly. Add
``JESTStatsCallback()`` to the Trainer's callbacks to log ``loader.stats``.
"""
from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by the missing-extra tests
    raise ModuleNotFoundError(f"jest_stream.client.lightning needs lightning ({exc.name} is missing): "
                              "pip install lightning") from None

from jest_stream.client.loader import JESTLoader


def jest_loaders(trainer: pl.Trainer) -> list[JESTLoader]:
    """The JESTLoaders among the trainer's train dataloaders."""
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    flat = getattr(loaders, "flattened", None)
    items = flat if flat is not None else (list(loaders.values()) if isinstance(loaders, dict)
                                          else loaders if isinstance(loaders, (list, tuple)) else [loaders])
    return [item for item in items if isinstance(item, JESTLoader)]


class JESTStatsCallback(pl.Callback):
    """Logs each JESTLoader's ``stats.scalars()`` under ``prefix`` every
    ``every_n_steps`` training batches (on rank 0's logger, as Lightning does)."""

    def __init__(self, every_n_steps: int = 50, prefix: str = "jest/"):
        self.every_n_steps = int(every_n_steps)
        self.prefix = prefix

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.every_n_steps <= 0 or (trainer.global_step % self.every_n_steps):
            return
        for i, loader in enumerate(jest_loaders(trainer)):
            prefix = self.prefix if i == 0 else f"{self.prefix}{i}/"
            figures = {k: v for k, v in loader.stats.scalars(prefix).items() if v == v}  # drop NaN
            pl_module.log_dict(figures, on_step=True, on_epoch=False, rank_zero_only=True)
