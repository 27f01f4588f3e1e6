"""Run as ``python lightning_ddp.py OUT_DIR MODEL_PATH``: Lightning DDP on 2 CPU processes
(gloo). Fit 2 epochs with a checkpoint after step 7 (mid-epoch 1), then fit again from
that checkpoint; each rank writes the keys it trained on (per epoch, per fit)."""
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: support.py
from support import KeyedDigits, load_digits_arrays  # noqa: E402

from jest_stream import JESTLoader, LocalScorer, per_example_cross_entropy
from jest_stream.client import shard
from jest_stream.client.lightning import JESTStatsCallback

B = 64


class Model(pl.LightningModule):
    def __init__(self, model_path: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        self.model_path = model_path
        self.seen: dict[int, list[list[str]]] = {}

    def score(self, batch):
        return per_example_cross_entropy(self.net(batch["x"]), batch["y"])

    def train_dataloader(self):
        base = shard(DataLoader(KeyedDigits(load_digits_arrays(), 640), batch_size=B, shuffle=True))
        return JESTLoader(base, self.score, LocalScorer(self.model_path, intra_op_threads=1),
                          n_select=16, seed=4)

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(list(batch["__key__"]))
        return torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(out_dir: str, model_path: str, ckpt_path: str | None) -> Model:
    model = Model(model_path)
    ckpt = ModelCheckpoint(dirpath=os.path.join(out_dir, "ckpt"), every_n_train_steps=7, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                         callbacks=[ckpt, JESTStatsCallback(every_n_steps=1)],
                         logger=CSVLogger(out_dir, name="logs", version=0 if ckpt_path is None else 1),
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=1, deterministic=True)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def main(out_dir: str, model_path: str) -> None:
    torch.set_num_threads(1)
    full = fit(out_dir, model_path, None)
    resumed = fit(out_dir, model_path, os.path.join(out_dir, "ckpt", "epoch=1-step=7.ckpt"))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"full": full.seen, "resumed": resumed.seen}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
