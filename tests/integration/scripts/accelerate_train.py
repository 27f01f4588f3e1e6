"""Run by ``accelerate launch --cpu --num_processes 2``: 2 epochs through a JESTLoader
around the prepared DataLoader; each rank writes the keys it trained on, per epoch."""
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: support.py
from support import KeyedDigits, load_digits_arrays  # noqa: E402

from jest_stream import JESTLoader, LocalScorer, per_example_cross_entropy


def main(out_dir: str, model_path: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = KeyedDigits(load_digits_arrays(), 640)
    model, opt, base = accelerator.prepare(model, opt, DataLoader(data, batch_size=64, shuffle=True))
    loader = JESTLoader(base, lambda b: per_example_cross_entropy(model(b["x"]), b["y"]),
                        LocalScorer(model_path, intra_op_threads=1), n_select=16, seed=3)
    epochs = []
    for _ in range(2):
        keys = []
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            keys.append(batch["__key__"])
        epochs.append(keys)
    with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w") as fh:
        json.dump({"epochs": epochs, "job_id": loader.job_id, "len": len(loader),
                   "fallbacks": loader.stats.fallbacks}, fh)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
