"""``jest-stream bench threads``: a local Select inside a training loop vs idle.

The embedded scorer shares the CPU with torch. For each scorer setting — ``bounded``
(LocalScorer's defaults: ONNX Runtime threads = cores // torch threads, BLAS held to 1
thread during the Select) and ``unbounded`` (both at one thread per core, the libraries'
own defaults) — the median Select latency is measured twice: ``idle`` (Selects back
to back) and ``in_step`` (each Select between training steps of a learner MLP, torch
at ``--threads`` threads, as JESTLoader runs it). The ratio in_step / idle is the
figure to read; rounds interleave the settings so load bursts on a shared machine hit
all of them alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from jest_stream.bench.loader import (DigitsBatches, digits_parser, export_reference_model, mlp,
                                      print_figures, train_step)
from jest_stream.client.learner import per_example_cross_entropy
from jest_stream.client.local import LocalScorer
from jest_stream.client.scorer import SelectCall


def select_once(scorer: LocalScorer, data: DigitsBatches, learner: torch.nn.Module, rows: np.ndarray,
                n_select: int, seed: int) -> float:
    """One Select of a super-batch (learner scores taken first, not timed): its seconds."""
    idx = torch.as_tensor(rows)
    with torch.no_grad():
        scores = per_example_cross_entropy(learner(data.x[idx]), data.y[idx])
    inputs = {"x": data.x[idx].numpy(), "y": data.y[idx].numpy()}
    started = time.perf_counter()
    scorer.select(SelectCall(model="digits", job_id="bench", learner=scores, n_select=n_select,
                             inputs=lambda: inputs, seed=seed))
    return time.perf_counter() - started


def measure(args: argparse.Namespace, model_path: str) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    data = DigitsBatches(args.repeat)
    scorers = {"bounded": LocalScorer(model_path, name="digits"),
               "unbounded": LocalScorer(model_path, name="digits", intra_op_threads=cores, blas_threads=cores)}
    learner = mlp(args.hidden, args.seed)
    opt = torch.optim.SGD(learner.parameters(), lr=0.01)
    rng = np.random.default_rng(args.seed)
    b = max(1, int(args.super_batch * (1 - args.ratio)))
    times: dict[str, list[float]] = {f"{s}_{m}": [] for s in scorers for m in ("idle", "in_step")}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, scorer in (scorers.items() if round_ % 2 else reversed(scorers.items())):
            for mode in ("idle", "in_step"):
                for step in range(args.steps):
                    rows = rng.choice(len(data), args.super_batch, replace=False)
                    if mode == "in_step":
                        batch = {"x": data.x[rows[:b]], "y": data.y[rows[:b]]}
                        train_step(learner, opt, batch)
                    seconds = select_once(scorer, data, learner, rows, b, step)
                    if round_:
                        times[f"{name}_{mode}"].append(seconds)
    out: dict[str, Any] = {"cores": cores, "torch_threads": torch.get_num_threads(),
                           "bounded_intra_op_threads": scorers["bounded"].intra_op_threads,
                           "super_batch": args.super_batch, "n_select": b}
    for key, values in times.items():
        out[f"{key}_ms"] = round(statistics.median(values) * 1e3, 3)
    for name in scorers:
        out[f"{name}_ratio"] = round(out[f"{name}_in_step_ms"] / out[f"{name}_idle_ms"], 2)
        scorers[name].close()
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = digits_parser("jest-stream bench threads", __doc__, super_batch=1280, ratio=0.8, repeat=2, rounds=4,
                      threads=2)
    p.add_argument("--steps", type=int, default=20, help="Selects per setting and round (default 20)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print its figures (JSON with --json)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="jest-bench-threads-") as tmp:
        path = export_reference_model(DigitsBatches(1), os.path.join(tmp, "digits.onnx"), args.seed)
        result = measure(args, path)
    print_figures(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
