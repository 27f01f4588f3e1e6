"""``jest-stream bench soak``: many training jobs against one scorer, for a long time.

A scorer process (``python -m jest_stream.server``) on a loopback port, and ``--jobs``
client jobs (asyncio tasks, each with its own grpc.aio channel) that do what a
JESTLoader does every step, as fast as they can: prefetch the reference outputs of the
next super-batch (Reference, return_outputs=false) while the current one is selected
(Select, inputs included). Half the jobs use a per_example model, half a
sigmoid_contrastive one; jobs share four key spaces (four "datasets"), and the cache
budget is smaller than their reference outputs, so the cache keeps hitting, missing and
evicting. Requests are built once per job from scikit-learn's digits (learner scores
from a fixed random linear learner per job), so the client spends its CPU on gRPC, not
on building requests.

After ``--warmup`` seconds at full load (threads, allocators, cache slabs all warm), the
scorer's resident memory is taken; then ``--seconds`` of measured load; then it is taken
again. Printed (``--json``: one JSON object):

- jobs, seconds, errors (failed calls and wrong answers, warm-up included);
- p50_ms, p99_ms: Select latency seen by the jobs in the measured window;
- rss_growth: (RSS after the run - RSS after warm-up) / RSS after warm-up;
- and calls, calls/s, examples/s, cache bytes vs budget, hit ratio, per-job calls.

Targets (exit 1 if missed): errors 0, rss_growth <= 0.10, cache within its budget.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from jest_stream import codec
from jest_stream.demo.data import load_digits_scaled
from jest_stream.server.launch import ScorerProcess, start_scorer
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RSS_TARGET = 0.10
DATASETS = 4          # key spaces the jobs share (job j reads dataset j % 4)
CALL_TIMEOUT = 30.0


# -- reference models and data ----------------------------------------------------------


def text_view(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The 'text' of a digit for the two-tower model: a second, noisy view of it."""
    rng = np.random.default_rng(seed)
    return np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


def build_models(directory: str, x: np.ndarray, y: np.ndarray) -> dict[str, str]:
    """Two small reference models exported with export_reference: a per_example MLP
    classifier trained on 500 digits, and a sigmoid_contrastive two-tower."""
    import torch

    from jest_stream.client.export import export_reference

    def mlp(out: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, out))

    classifier = mlp(10, 0)
    opt = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:500]), torch.from_numpy(y[:500])
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(classifier(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    paths = {"digits": os.path.join(directory, "digits.onnx"), "siglip": os.path.join(directory, "siglip.onnx")}
    export_reference(classifier, torch.nn.CrossEntropyLoss(reduction="none"), paths["digits"],
                     example_inputs=(xt[:4], yt[:4]), input_names=("x", "y"), kind="per_example")

    class TwoTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.text = mlp(16, 3), mlp(16, 4)

        def forward(self, image, text):
            return (torch.nn.functional.normalize(self.image(image), dim=-1),
                    torch.nn.functional.normalize(self.text(text), dim=-1))

    export_reference(TwoTower(), None, paths["siglip"], example_inputs=(xt[:4], xt[:4]),
                     input_names=("image", "text"), kind="sigmoid_contrastive", logit_scale=10.0, logit_bias=-5.0)
    return paths


# -- the jobs -----------------------------------------------------------------------------


@dataclass
class JobPlan:
    """One job's pre-built requests: a Select and a Reference per super-batch of its epoch."""

    name: str
    selects: list[pb.SelectRequest]
    references: list[pb.ReferenceRequest]
    batch: int
    n_select: int


def _normalize(z: np.ndarray) -> np.ndarray:
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-6)).astype(np.float32)


def _model_inputs(info: pb.ModelInfo, x: np.ndarray, y: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
    """Map digits onto a model's inputs: integer inputs get the labels; float inputs get
    the features, then (a second float input) the text view."""
    out, floats = {}, [x, text]
    for spec in info.inputs:
        if spec.dtype in (pb.DT_INT64, pb.DT_INT32):
            out[spec.name] = y.astype(np.int64 if spec.dtype == pb.DT_INT64 else np.int32)
        else:
            out[spec.name] = floats.pop(0) if floats else x
    return out


def plan_jobs(models: Sequence[pb.ModelInfo], n_jobs: int, batch: int, n_select: int, x: np.ndarray,
              y: np.ndarray) -> list[JobPlan]:
    """Job j: model j % len(models), dataset j % 4 (its keys), its own shuffle and learner."""
    text = text_view(x)
    plans = []
    samplers = ("joint", "joint", "topk", "uniform")
    for j in range(n_jobs):
        info = models[j % len(models)]
        dataset = j % DATASETS
        rng = np.random.default_rng(1000 + j)
        order = rng.permutation(len(y))
        w_image = rng.standard_normal((64, 16)).astype(np.float32)
        w_text = rng.standard_normal((64, 16)).astype(np.float32)
        w_class = rng.standard_normal((64, 10)).astype(np.float32) * 0.1
        selects, references = [], []
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start:start + batch]
            keys = [f"ds{dataset}/digit-{i:05d}" for i in rows]
            inputs = _model_inputs(info, x[rows], y[rows], text[rows])
            request = pb.SelectRequest(model=info.name, job_id=f"soak-{j:02d}", keys=keys, n_select=n_select,
                                       sampler=samplers[(j // len(models)) % len(samplers)])
            codec.encode_map(inputs, request.inputs)
            if info.kind == "per_example":  # a fixed random linear learner's cross-entropy
                logits = x[rows] @ w_class
                logits -= logits.max(axis=1, keepdims=True)
                logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
                codec.encode(-logp[np.arange(batch), y[rows]].astype(np.float32), request.learner.losses)
            else:
                codec.encode(_normalize(x[rows] @ w_image), request.learner.image_embeds)
                codec.encode(_normalize(text[rows] @ w_text), request.learner.text_embeds)
                request.learner.logit_scale, request.learner.logit_bias = 10.0, -5.0
            selects.append(request)
            reference = pb.ReferenceRequest(model=info.name, job_id=request.job_id, keys=keys, return_outputs=False)
            codec.encode_map(inputs, reference.inputs)
            references.append(reference)
        plans.append(JobPlan(f"soak-{j:02d}", selects, references, batch, n_select))
    return plans


@dataclass
class Tally:
    """What the jobs saw."""

    measuring: bool = False
    stop: bool = False
    latencies: list[float] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)        # measured Selects per job
    references: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


def _check(reply: pb.SelectResponse, plan: JobPlan) -> str | None:
    idx = list(reply.indices)
    if len(idx) != plan.n_select or len(set(idx)) != len(idx) or not all(0 <= i < plan.batch for i in idx):
        return (f"{plan.name}: bad indices {idx[:8]}... ({len(idx)}, expected {plan.n_select} distinct "
                f"in [0, {plan.batch}))")
    if not (math.isfinite(reply.mean_score) and math.isfinite(reply.mean_score_all)):
        return f"{plan.name}: non-finite scores {reply.mean_score}, {reply.mean_score_all}"
    return None


async def _prefetch(stub, request: pb.ReferenceRequest, tally: Tally, name: str) -> None:
    try:
        await stub.Reference(request, timeout=CALL_TIMEOUT)
        tally.references += 1
    except grpc.aio.AioRpcError as exc:
        tally.error(f"{name} Reference: {exc.code().name}: {exc.details()}")


async def run_job(target: str, plan: JobPlan, tally: Tally, max_message_bytes: int) -> None:
    """Loop over the job's super-batches until told to stop: Reference(t+1) || Select(t)."""
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.ScorerStub(channel)
        n = len(plan.selects)
        step = 0
        while not tally.stop:
            request = plan.selects[step % n]
            request.seed = step
            prefetch = asyncio.ensure_future(_prefetch(stub, plan.references[(step + 1) % n], tally, plan.name))
            started = time.perf_counter()
            try:
                reply = await stub.Select(request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                tally.error(f"{plan.name} Select: {exc.code().name}: {exc.details()}")
            else:
                elapsed = time.perf_counter() - started
                problem = _check(reply, plan)
                if problem:
                    tally.error(problem)
                elif tally.measuring:
                    tally.latencies.append(elapsed)
                    tally.calls[plan.name] = tally.calls.get(plan.name, 0) + 1
            await prefetch
            step += 1


async def drive(scorer: ScorerProcess, plans: list[JobPlan], warmup: float, seconds: float,
                max_message_bytes: int) -> dict[str, Any]:
    """Run the jobs: warm-up, RSS, measured window, RSS."""
    import psutil

    proc = psutil.Process(scorer.proc.pid)
    tally = Tally()
    tasks = [asyncio.ensure_future(run_job(scorer.target, plan, tally, max_message_bytes)) for plan in plans]
    rss_samples: list[int] = []

    async def sample_until(end: float) -> None:
        while time.monotonic() < end and not all(t.done() for t in tasks):
            rss_samples.append(proc.memory_info().rss)
            await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))

    await sample_until(time.monotonic() + warmup)
    rss_warm = proc.memory_info().rss
    tally.measuring = True
    started = time.monotonic()
    await sample_until(started + seconds)
    tally.measuring = False
    measured = time.monotonic() - started
    rss_end = proc.memory_info().rss
    tally.stop = True
    for task in tasks:
        try:
            await asyncio.wait_for(task, CALL_TIMEOUT + 10)
        except Exception as exc:  # a job that died: an error, not a crash of the bench
            tally.error(f"job task: {type(exc).__name__}: {exc}")
    return {"tally": tally, "rss_warm": rss_warm, "rss_end": rss_end, "rss_max": max(rss_samples + [rss_end]),
            "measured": measured}


def run_soak(models: Mapping[str, str], *, jobs: int = 16, seconds: float = 60.0, warmup: float = 10.0,
             batch: int = 256, filter_ratio: float = 0.8, cache_bytes: int = 512 << 10,
             max_message_bytes: int = 64 << 20, intra_op_threads: int = 1, log_path: str | None = None,
             data: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Start a scorer with ``models``, run the soak, stop the scorer; returns the figures."""
    x, y = data if data is not None else load_digits_scaled()
    n_select = max(1, int(round((1 - filter_ratio) * batch)))
    own_log = log_path is None
    if own_log:
        fd, log_path = tempfile.mkstemp(prefix="jest-soak-", suffix=".log")
        os.close(fd)
    flags = ["--cache-bytes", str(cache_bytes), "--intra-op-threads", str(intra_op_threads),
             "--max-message-bytes", str(max_message_bytes)]
    scorer = start_scorer(models, log_path, *flags, metrics=True, timeout=120.0)
    try:
        with grpc.insecure_channel(scorer.target) as channel:
            infos = list(pb_grpc.ScorerStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models)
        plans = plan_jobs(infos, jobs, batch, n_select, x, y)
        figures = asyncio.run(drive(scorer, plans, warmup, seconds, max_message_bytes))
        text = scorer.metrics()
    finally:
        exit_code = scorer.stop()
    result = _summarize(scorer, figures, text, exit_code, jobs=jobs, batch=batch, n_select=n_select,
                        warmup=warmup, cache_bytes=cache_bytes, log_path=log_path)
    if own_log and result["ok"]:  # nothing to look at: do not leave temporary files behind
        os.unlink(log_path)
        result["log"] = None
    return result


def _summarize(scorer: ScorerProcess, figures: dict[str, Any], text: str, exit_code: int, *, jobs: int,
               batch: int, n_select: int, warmup: float, cache_bytes: int, log_path: str) -> dict[str, Any]:
    """The soak's figures from the clients' tally and the scorer's final metrics."""
    tally: Tally = figures["tally"]
    lat = np.asarray(tally.latencies) * 1e3
    hits = scorer.metric("jest_cache_hits_total", text)
    misses = scorer.metric("jest_cache_misses_total", text)
    server_failed = sum(scorer.metric("jest_calls_total", text, code=code) for code in (
        "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED",
        "CANCELLED"))
    cache_held = scorer.metric("jest_cache_bytes", text)
    calls = int(lat.size)
    result = {
        "jobs": jobs,
        "seconds": round(figures["measured"], 1),
        "errors": tally.errors,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if calls else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if calls else None,
        "rss_growth": round((figures["rss_end"] - figures["rss_warm"]) / figures["rss_warm"], 4),
        "calls": calls,
        "calls_per_s": round(calls / figures["measured"], 1),
        "examples_per_s": round(calls * batch / figures["measured"], 1),
        "references": tally.references,
        "batch": batch,
        "n_select": n_select,
        "warmup_s": warmup,
        "rss_warm_mb": round(figures["rss_warm"] / 2**20, 1),
        "rss_end_mb": round(figures["rss_end"] / 2**20, 1),
        "rss_max_mb": round(figures["rss_max"] / 2**20, 1),
        "cache_bytes": int(cache_held),
        "cache_budget": cache_bytes,
        "cache_hit_ratio": round(hits / (hits + misses), 3) if hits + misses else None,
        "server_failed_calls": int(server_failed),
        "server_exit": exit_code,
        "per_job_calls": dict(sorted(tally.calls.items())),
        "error_samples": tally.error_samples,
        "log": log_path,
    }
    result["ok"] = bool(result["errors"] == 0 and result["rss_growth"] <= RSS_TARGET
                        and result["cache_bytes"] <= cache_bytes and calls > 0 and exit_code == 0)
    return result


def _model_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model: expected NAME=PATH, got {value!r}")
    return name, path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jest-stream bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--jobs", type=int, default=16, help="concurrent client jobs")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the measured run")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of load before the RSS baseline (default: max(3, seconds / 6))")
    p.add_argument("--batch", type=int, default=256, help="super-batch size B")
    p.add_argument("--filter-ratio", type=float, default=0.8, help="fraction of each super-batch dropped")
    p.add_argument("--cache-bytes", type=int, default=512 << 10,
                   help="the scorer's reference cache budget (small: the cache keeps evicting)")
    p.add_argument("--intra-op-threads", type=int, default=1, help="the scorer's ONNX Runtime threads")
    p.add_argument("--model", action="append", type=_model_arg, default=[],
                   help="reference model NAME=PATH (repeatable; inputs digits-shaped); default: two "
                        "small models (per_example, sigmoid_contrastive) exported here")
    p.add_argument("--log", help="the scorer's log file (default: a temporary file)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.seconds <= 0 or args.batch < 2 or not 0 <= args.filter_ratio < 1:
        p.error("--jobs >= 1, --seconds > 0, --batch >= 2 and 0 <= --filter-ratio < 1")
    warmup = args.warmup if args.warmup is not None else max(3.0, args.seconds / 6)
    data = load_digits_scaled()
    with tempfile.TemporaryDirectory(prefix="jest-soak-") as tmp:
        models = dict(args.model) or build_models(tmp, *data)
        log.info("soak: %d jobs, %.0f s warm-up + %.0f s against %s", args.jobs, warmup, args.seconds,
                 ", ".join(models))
        result = run_soak(models, jobs=args.jobs, seconds=args.seconds, warmup=warmup, batch=args.batch,
                          filter_ratio=args.filter_ratio, cache_bytes=args.cache_bytes,
                          intra_op_threads=args.intra_op_threads, log_path=args.log, data=data)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"soak: {result['jobs']} jobs for {result['seconds']} s: {result['calls']} Selects "
              f"({result['calls_per_s']}/s, {result['examples_per_s']} examples/s), errors {result['errors']}")
        print(f"Select latency p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
        print(f"scorer RSS {result['rss_warm_mb']} MB after warm-up -> {result['rss_end_mb']} MB "
              f"(growth {result['rss_growth']:+.1%}, target <= {RSS_TARGET:.0%})")
        print(f"cache {result['cache_bytes']} / {result['cache_budget']} bytes, hit ratio {result['cache_hit_ratio']}")
        print("targets met" if result["ok"] else f"TARGETS MISSED: {result['error_samples'][:3]}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
