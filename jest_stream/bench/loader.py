"""``jest-stream bench loader``: what JESTLoader costs beside a plain DataLoader.

Side by side in one run, on the same data (scikit-learn's digits, tiled), the same
learner (an MLP trained with SGD) and the same sub-batches:

- plain: a DataLoader yielding exactly the sub-batches JESTLoader selected;
- local: JESTLoader with LocalScorer and the ``uniform`` sampler;
- remote: the same with RemoteScorer against a server on loopback, reference prefetch on.

overhead_local = (local wall time per sub-batch - learner scoring time) / plain - 1;
overhead_remote = the same for remote / the same for local - 1. The uniform sampler
makes the selections independent of the learner, so all three train on the same
sub-batches (checked). The three run step-interleaved (each step advances all three by
one sub-batch, in rotating order), so that bursts of load on a shared machine hit them
alike; the figures are medians of per-sub-batch times over ``--rounds`` epochs, after
a warm-up epoch that fills the reference caches. The dataset reads a batch of rows at a
time and both DataLoaders pass batches through as read (no per-item collation).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from jest_stream.client.loader import JESTLoader, step_seed
from jest_stream.client.remote import RemoteScorer
from jest_stream.client.local import LocalScorer
from jest_stream.client.learner import per_example_cross_entropy
from jest_stream.samplers import uniform
from jest_stream.selection import make_rng
from jest_stream.server.launch import scorer_process

log = logging.getLogger(__name__)
MODEL = "digits"


class DigitsBatches(torch.utils.data.Dataset):
    """Digits features (scaled to [0, 1]), labels, keys and row ids, read a batch of
    rows at a time (``dataset[list_of_rows]``), as a sharded or memory-mapped store would."""

    def __init__(self, repeat: int):
        from jest_stream.demo.data import load_digits_scaled

        x, y = load_digits_scaled()
        self.x = torch.from_numpy(np.tile(x, (repeat, 1)))
        self.y = torch.from_numpy(np.tile(y, repeat))
        self.keys = [f"digit-{i:06d}" for i in range(len(self.y))]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, rows: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(rows)
        return {"x": self.x[idx], "y": self.y[idx], "row": idx, "__key__": [self.keys[i] for i in rows]}


def as_read(batch: dict) -> dict:
    """The DataLoader's collate_fn: batches come out of the dataset ready to use."""
    return batch


def mlp(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def export_reference_model(data: DigitsBatches, path: str, seed: int) -> str:
    """A small reference MLP trained on the first 500 clean digits, exported to ONNX."""
    from jest_stream.client.export import export_reference

    model = mlp(64, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(data.x[:500]), data.y[:500])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    example = (torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
    export_reference(model, torch.nn.CrossEntropyLoss(reduction="none"), path,
                     example_inputs=example, input_names=("x", "y"), kind="per_example")
    return path


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    loss = F.cross_entropy(model(batch["x"]), batch["y"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class Learner:
    """One copy of the learner and its optimiser (each loop trains its own, same init)."""

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def score(self, batch: dict):
        return per_example_cross_entropy(self.model(batch["x"]), batch["y"])


def timed_step(it: Iterator[dict], learner: Learner, loader: JESTLoader | None) -> tuple[float, np.ndarray]:
    """Fetch one sub-batch and train on it: (seconds, minus the learner's scoring time; rows)."""
    scoring = loader.stats.learner_seconds if loader is not None else 0.0
    started = time.perf_counter()
    batch = next(it)
    train_step(learner.model, learner.opt, batch)
    seconds = time.perf_counter() - started
    if loader is not None:
        seconds -= loader.stats.learner_seconds - scoring
    return seconds, batch["row"].numpy()


def uniform_rows(epoch_start_step: int, n_steps: int, args: argparse.Namespace, b: int) -> list[list[int]]:
    """The rows JESTLoader's uniform sampler picks at these steps (super-batches in order)."""
    return [(t * args.super_batch + uniform(args.super_batch, b, make_rng(
        step_seed(args.seed, 0, epoch_start_step + t)))).tolist() for t in range(n_steps)]


def measure(args: argparse.Namespace, model_path: str, target: str) -> dict[str, Any]:
    """Step-interleaved timing: each step advances plain, local and remote by one
    sub-batch (in rotating order), so bursts of load on a shared machine hit all three."""
    data = DigitsBatches(args.repeat)
    init = mlp(args.hidden, args.seed + 1)
    learners = {name: Learner(init) for name in ("plain", "local", "remote")}

    def super_batches() -> DataLoader:
        return DataLoader(data, sampler=BatchSampler(SequentialSampler(data), args.super_batch, drop_last=True),
                          batch_size=None, collate_fn=as_read)

    common = dict(model=MODEL, filter_ratio=args.ratio, sampler="uniform", seed=args.seed, job="bench-loader")
    local_scorer = LocalScorer(model_path, name=MODEL, intra_op_threads=1)
    remote_scorer = RemoteScorer(target)
    loaders = {
        "local": JESTLoader(super_batches(), learners["local"].score, local_scorer, **common),
        "remote": JESTLoader(super_batches(), learners["remote"].score, remote_scorer, prefetch=True, **common),
    }
    b = loaders["local"]._sub_batch_size(args.super_batch)
    n_steps = len(data) // args.super_batch
    times: dict[str, list[float]] = {"plain": [], "local": [], "remote": []}
    same = True
    try:
        for epoch in range(args.rounds + 1):  # epoch 0 warms caches, threads and allocators
            rows = uniform_rows(epoch * n_steps, n_steps, args, b)
            its: dict[str, Iterator[dict]] = {name: iter(loader) for name, loader in loaders.items()}
            its["plain"] = iter(DataLoader(data, sampler=rows, batch_size=None, collate_fn=as_read))
            for t in range(n_steps):
                order = ["plain", "local", "remote"]
                order = order[t % 3:] + order[:t % 3]
                for name in order:
                    seconds, got = timed_step(its[name], learners[name], loaders.get(name))
                    same &= got.tolist() == rows[t]
                    if epoch:
                        times[name].append(seconds)
            for name in ("local", "remote"):
                assert next(its[name], None) is None, "the epoch should be over"
    finally:
        local_scorer.close()
        remote_scorer.close()
    return _figures(times, {name: loader.stats for name, loader in loaders.items()}, same, args, b)


def _figures(times: dict[str, list[float]], stats: dict[str, Any], same: bool, args: argparse.Namespace,
             b: int) -> dict[str, Any]:
    """Overheads from the per-sub-batch times, and what the loaders counted."""
    typical = {name: statistics.median(v) for name, v in times.items()}
    return {
        "overhead_local": round(typical["local"] / typical["plain"] - 1.0, 4),
        "overhead_remote": round(typical["remote"] / typical["local"] - 1.0, 4),
        "ms_per_sub_batch": {name: round(v * 1e3, 3) for name, v in typical.items()},
        "overhead_local_ms": round((typical["local"] - typical["plain"]) * 1e3, 3),
        "overhead_remote_ms": round((typical["remote"] - typical["local"]) * 1e3, 3),
        "learner_scoring_ms_per_sub_batch": {
            name: round(s.learner_seconds / max(1, s.sub_batches) * 1e3, 3) for name, s in stats.items()},
        "scorer_latency_p50_ms": {name: round(s.latency_ms(0.5), 3) for name, s in stats.items()},
        "fallbacks": {name: s.fallbacks for name, s in stats.items()},
        "cache_hits": {name: s.cache_hits for name, s in stats.items()},
        "same_sub_batches": bool(same),
        "timed_sub_batches": len(times["plain"]),
        "super_batch": args.super_batch, "sub_batch": b,
        "learner": f"MLP 64-{args.hidden}-{args.hidden}-10, SGD", "torch_threads": torch.get_num_threads(),
        "reference_cache": "warm (timed after one warm-up epoch)",
        "statistic": "median per sub-batch of step-interleaved runs, learner scoring time excluded",
        "targets": {"overhead_local": 0.05, "overhead_remote": 0.10},
    }


def digits_parser(prog: str, doc: str, *, super_batch: int, ratio: float, repeat: int, rounds: int,
                  threads: int) -> argparse.ArgumentParser:
    """The flags the digits benchmarks share (B, f, learner width, data, rounds, threads, seed)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--super-batch", type=int, default=super_batch, help=f"B (default {super_batch})")
    p.add_argument("--ratio", type=float, default=ratio, help=f"filter ratio f; b = (1-f) B (default {ratio})")
    p.add_argument("--hidden", type=int, default=1024, help="learner MLP width (default 1024)")
    p.add_argument("--repeat", type=int, default=repeat,
                   help=f"tile the 1797 digits this many times (default {repeat})")
    p.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds (default {rounds})")
    p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    return digits_parser("jest-stream bench loader", __doc__, super_batch=256, ratio=0.75, repeat=4, rounds=5,
                         threads=1).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print its figures (JSON with --json)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="jest-bench-loader-") as tmp:
        model_path = export_reference_model(DigitsBatches(1), os.path.join(tmp, "digits.onnx"), args.seed)
        with scorer_process({MODEL: model_path}, os.path.join(tmp, "server.log"),
                            "--intra-op-threads", "1") as scorer:
            result = measure(args, model_path, scorer.target)
    print_figures(result, args.json)
    return 0


def print_figures(result: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures: one JSON object, or one aligned ``name: value`` line each."""
    if as_json:
        print(json.dumps(result))
        return
    width = max(map(len, result), default=0)
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")


if __name__ == "__main__":
    sys.exit(main())
