"""``jest-stream demo``: does online data selection speed up learning? Measured, not assumed.

On scikit-learn's handwritten digits with a fraction of the training data corrupted
(labels flipped, or pairs mismatched with ``--task contrastive``), the demo

1. writes the training split as WebDataset shards and reads them back;
2. trains a reference model on a small clean split and exports it to ONNX with the
   project's export helper;
3. trains the same learner with ``uniform``, ``learnability + topk`` (RHO-LOSS) and
   ``learnability + joint`` (JEST) sub-batches, through JESTLoader and the embedded
   scorer (``--remote``: a local gRPC scoring server, started and stopped here), over
   several seeds;
4. prints a table (or ``--json``) and writes a PNG of the test metric against steps.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from jest_stream.options import LOOKAHEADS

log = logging.getLogger(__name__)

TASKS = ("classification", "contrastive")
METHODS = ("uniform", "topk", "joint")
MODEL_NAME = "reference"


def _task(args: argparse.Namespace):
    """The Task the flags ask for (contrastive: its loss and preset)."""
    if args.task == "classification":
        if args.loss is not None or args.preset is not None:
            raise SystemExit("--loss and --preset: only for --task contrastive")
        from jest_stream.demo.classification import TASK
        return TASK
    from jest_stream.demo.contrastive import preset_for, task

    return task(args.loss or "sigmoid", args.preset or preset_for(args.super_batch))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jest-stream demo",
        description="Train on noisy digits with uniform, RHO-LOSS (learnability + topk) and JEST "
                    "(learnability + joint) selection; print a table and write a PNG.")
    p.add_argument("--task", choices=TASKS, default="classification",
                   help="classification (flipped labels) or contrastive (mismatched pairs, two towers)")
    p.add_argument("--loss", choices=("sigmoid", "softmax"),
                   help="contrastive: the learner's and the reference's loss, SigLIP's sigmoid "
                        "(default) or CLIP's softmax")
    p.add_argument("--preset", choices=("small", "large"),
                   help="contrastive: small (one pair per digit, B=160) or large (16 views per "
                        "digit, B=1280, 300 steps, 40%% mismatched); default large when "
                        "--super-batch >= 512, else small")
    p.add_argument("--noise", type=float,
                   help="fraction of training labels flipped / pairs mismatched (default 0.3; "
                        "contrastive large 0.4)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds per method (default 5)")
    p.add_argument("--steps", type=int,
                   help="learner steps (sub-batches) per run (default 600; contrastive 400, large 300)")
    p.add_argument("--super-batch", type=int, help="super-batch size B (default 160; contrastive large 1280)")
    p.add_argument("--filter-ratio", type=float, default=0.8,
                   help="fraction f of each super-batch dropped; b = (1 - f) B (default 0.8)")
    p.add_argument("--lr", type=float, help="learner learning rate, Adam (default 0.002)")
    p.add_argument("--score-gain", type=float,
                   help="multiplier on scores before joint sampling (default 2; contrastive: the "
                        "loss kind's default, jest_stream.options.DEFAULT_GAINS)")
    p.add_argument("--n-chunks", type=int, help="chunks of the joint sampler (default 16)")
    p.add_argument("--lookahead", choices=LOOKAHEADS, default="in_batch",
                   help="the joint sampler's contrastive scores count the rest of the sub-batch "
                        "(in_batch, the default) or the selected set only (none: JEST as published)")
    p.add_argument("--eval-every", type=int, help="evaluate the test metric every N steps (default 10)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of uniform,topk,joint (uniform is always run)")
    p.add_argument("--remote", nargs="?", const="local", default=None, metavar="TARGET",
                   help="select through a gRPC scorer: alone, start a local one; with TARGET "
                        "(host:port), use that running scorer, which must serve the demo's "
                        f"reference under the model name {MODEL_NAME!r}")
    p.add_argument("--token-file", default=os.environ.get("JEST_TOKEN_FILE"),
                   help="bearer token for --remote TARGET [env JEST_TOKEN_FILE]")
    p.add_argument("--out", default="jest-stream-demo",
                   help="folder for shards, the reference model and the PNG (default ./jest-stream-demo)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch, ONNX Runtime and numpy BLAS threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--curves", action="store_true", help="with --json, include the per-step curves")
    return p


def _config(args: argparse.Namespace, defaults: dict, kind: str):
    from jest_stream.demo.training import TrainConfig
    from jest_stream.options import DEFAULT_GAINS, SelectOptions

    big_b = args.super_batch or defaults["super_batch"]
    if not 0.0 <= args.filter_ratio < 1.0:
        raise SystemExit(f"--filter-ratio: expected a fraction in [0, 1), got {args.filter_ratio}")
    small_b = max(1, int(round((1.0 - args.filter_ratio) * big_b)))
    gain = args.score_gain if args.score_gain is not None else defaults["score_gain"]
    try:
        rule = SelectOptions(score="learnability",
                             score_gain=float(DEFAULT_GAINS[kind] if gain is None else gain),
                             n_chunks=args.n_chunks or defaults["n_chunks"], lookahead=args.lookahead)
    except ValueError as exc:  # e.g. --score-gain -1: say so before any data is made
        raise SystemExit(f"demo: {exc}") from None
    return TrainConfig(steps=args.steps or defaults["steps"], super_batch=big_b, sub_batch=small_b,
                       lr=args.lr or defaults["lr"], eval_every=args.eval_every or defaults["eval_every"],
                       rule=rule)


@contextlib.contextmanager
def local_server(model_path: str, log_path: str, threads: int = 1,
                 timeout: float = 60.0) -> Iterator[str]:
    """Start ``python -m jest_stream.server`` on a loopback port the kernel assigns, serving
    the reference model; yield its target once its health service says SERVING; stop it
    (SIGTERM) on exit."""
    from jest_stream.server.launch import scorer_process

    with scorer_process({MODEL_NAME: model_path}, log_path, "--intra-op-threads", str(threads),
                        timeout=timeout) as scorer:
        log.info("scoring server pid %d on %s", scorer.proc.pid, scorer.target)
        yield scorer.target


def _open_scorer(stack: contextlib.ExitStack, args: argparse.Namespace, model_path: str, out: str) -> Any:
    """The scorer the flags ask for (embedded, a local gRPC server, or a running one),
    closed (and the local server stopped) when ``stack`` closes."""
    if args.remote:
        from jest_stream.client.remote import RemoteScorer

        token = None
        if args.token_file:
            with open(args.token_file) as fh:
                token = fh.read().strip()
        if args.remote == "local":
            target = stack.enter_context(local_server(model_path, os.path.join(out, "server.log"),
                                                      args.threads))
        else:
            target = args.remote
        scorer: Any = RemoteScorer(target, token=token)
    else:
        from jest_stream.client.local import LocalScorer

        scorer = LocalScorer(model_path, name=MODEL_NAME, intra_op_threads=max(1, args.threads))
    stack.callback(scorer.close)
    return scorer


def _checked(args: argparse.Namespace, task: Any) -> tuple[list[str], float]:
    """The methods to run and the noise level, checked."""
    methods = ["uniform"] + [m for m in args.methods.split(",") if m and m != "uniform"]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; expected a subset of {','.join(METHODS)}")
    noise = task.defaults.get("noise", 0.3) if args.noise is None else args.noise
    if not 0.0 <= noise < 1.0:
        raise SystemExit(f"--noise: expected a fraction in [0, 1), got {noise}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds: expected at least 1, got {args.seeds}")
    return methods, noise


def _summary_config(args: argparse.Namespace, task: Any, config: Any, noise: float, seeds: list[int]) -> dict:
    """What ran, for the summary's ``config``."""
    scorer = ("embedded" if not args.remote else "remote (local gRPC server)" if args.remote == "local"
              else f"remote ({args.remote})")
    return {
        "description": task.description.format(noise=noise), "variant": task.name + task.file_suffix,
        "noise": noise, "super_batch": config.super_batch, "sub_batch": config.sub_batch,
        "filter_ratio": round(config.filter_ratio, 4), "steps": config.steps, "lr": config.lr,
        "score_gain": config.rule.score_gain, "n_chunks": config.rule.n_chunks,
        "lookahead": config.rule.lookahead,
        "eval_every": config.eval_every,
        "seeds": seeds, "scorer": scorer, "threads": args.threads,
    }


def run(args: argparse.Namespace) -> dict:
    """Run the demo described by parsed ``args``; return the summary (see demo_report)."""
    import numpy as np
    import torch

    from jest_stream.demo.data import read_shards, write_shards
    from jest_stream.demo.report import MethodRuns, plot, summarize
    from jest_stream.demo.training import SuperBatches, test_tensors, train_run

    torch.set_num_threads(max(1, args.threads))
    task = _task(args)
    config = _config(args, task.defaults, task.kind)
    (methods, noise), seeds = _checked(args, task), list(range(args.seeds))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    started, cpu_started = time.perf_counter(), time.process_time()
    data = task.make_data(noise, 0)
    name = task.name + task.file_suffix
    shard_dir = os.path.join(out, f"shards-{name}")
    for old in glob.glob(os.path.join(shard_dir, "train-*.tar")):  # a previous run's shards
        os.remove(old)
    per_shard = 128 if len(data.train) <= 4096 else 1024  # large pools: fewer, bigger shards
    shards = write_shards(data.train, shard_dir, prefix="train", fields=task.fields, per_shard=per_shard)
    keys, columns = read_shards(shards)
    train = SuperBatches(keys, columns)
    corrupted = dict(zip(data.train.keys, (bool(c) for c in data.train.corrupted)))
    test = test_tensors(data.test, task.fields)

    reference = task.train_reference(data.reference, 0)
    reference_metric = task.evaluate(reference, test)
    model_path = task.export(reference, os.path.join(out, f"reference-{name}.onnx"))
    log.info("%d shards in %s; reference %s on the clean test split: %.4f; exported to %s",
             len(shards), shard_dir, task.metric, reference_metric, model_path)
    prepared = time.perf_counter() - started

    runs: dict[str, MethodRuns] = {}
    with contextlib.ExitStack() as stack:
        scorer = _open_scorer(stack, args, model_path, out)
        for method in methods:
            for seed in seeds:
                result = train_run(task, train, corrupted, test, scorer, method=method, seed=seed,
                                   config=config, model_name=MODEL_NAME)
                runs.setdefault(method, MethodRuns(method, np.asarray(result.steps))).add(result)
                log.info("%s seed %d: final %s %.4f, corrupted chosen %.1f%%, %.1f s", method, seed,
                         task.metric, result.values[-1], 100 * result.corrupted_selected, result.seconds)

    cfg = _summary_config(args, task, config, noise, seeds)
    cfg.update(n_train=len(keys), n_reference=len(data.reference), n_test=len(data.test),
               reference_metric=reference_metric, shards=len(shards))
    summary = summarize(runs, task=task.name, metric=task.metric, config=cfg,
                        reference_training_F=3.0 * task.reference_train_examples,
                        cache_fill_F=1.0 * len(keys))
    png = f"demo-{name}.png" if not task.file_suffix else \
        f"demo-{name}-B{config.super_batch}-f{config.filter_ratio:.2g}.png"
    summary["plot"] = plot(runs, summary, os.path.join(out, png))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["seconds_preparing"] = round(prepared, 1)
    summary["cpu_seconds"] = round(time.process_time() - cpu_started, 1)  # the machine may be shared
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jest-stream demo``; prints the table (or JSON) and returns 0."""
    from jest_stream.demo.report import format_table, to_json

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.json:  # keep stdout clean for the JSON
        logging.getLogger().setLevel(logging.WARNING)
    from threadpoolctl import threadpool_limits

    # numpy's BLAS threads too: on a few cores, threads spinning after each small matmul of
    # the selection cost more than they save (measured: 14x the CPU time at B=1280).
    with threadpool_limits(limits=max(1, args.threads)):
        summary = run(args)
    if args.json:
        print(to_json(summary, curves=args.curves))
    else:
        print(format_table(summary))
        print(f"({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
