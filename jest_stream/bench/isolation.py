"""``jest-stream bench isolation``: one good job beside hostile or heavy tenants.

A scorer process on loopback (a bearer token set, default request limits) serves a
per_example and a sigmoid_contrastive reference model exported here. A good job makes
``--calls`` Selects one after another (B=256, b=64, its keys cached after the first
call), first alone, then beside each of:

- flood: ``--flood-tasks`` tasks sending malformed requests as fast as they can
  (garbage bytes, wrong dtypes and shapes, NaN losses, unknown models);
- heavy: four jobs sending the heaviest Select the default limits allow (sigmoid,
  hard_learner, B = b, d = 1, 1024 chunks, its work just under --max-select-work);
- unauth: 8 concurrent unauthenticated requests of ``--unauth-mb`` MiB each, in rounds.

Printed (``--json``: one object): p50/p99 of the good job's Select in each phase
(``p99_alone_ms``, ``p99_flood_ms``, ``p99_heavy_ms``, ``p99_unauth_ms``), the scorer's
peak RSS growth over its idle RSS (``rss_growth_mb``, the worst phase), and
``wrong_answers``: good-job replies whose indices differ from the core's ``select()`` on
reference outputs computed here, plus good-job calls that failed. Targets: each p99
beside <= 2x alone, RSS growth within the in-flight and cache budgets, 0 wrong answers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from jest_stream import codec
from jest_stream.demo.data import load_digits_scaled
from jest_stream.options import SelectOptions
from jest_stream.outputs import Losses
from jest_stream.selection import select
from jest_stream.server.launch import start_scorer
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

TOKEN = "isolation-bench-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
OPTIONS = [("grpc.max_receive_message_length", 512 << 20), ("grpc.max_send_message_length", 512 << 20)]
CALL_TIMEOUT = 30.0


def _heaviest_batch(limit: int) -> int:
    """The largest B (= b) whose heavy request stays within ``limit`` work units."""
    from jest_stream.server.limits import selection_work

    batch = 2
    while selection_work("sigmoid_contrastive", batch * 2, batch * 2, 1, 1024, "joint") <= limit:
        batch *= 2
    return batch


class GoodJob:
    """The well-behaved tenant: B=256 digits, its core answers computed here."""

    def __init__(self, model_path: str, x: np.ndarray, y: np.ndarray, batch: int = 256, n_select: int = 64):
        import onnxruntime as ort

        self.idx = np.arange(batch)
        self.inputs = {"x": x[:batch], "y": y[:batch]}
        session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        self.reference = Losses(session.run(["loss"], self.inputs)[0].reshape(-1))
        self.batch, self.n_select = batch, n_select
        self.keys = [f"good-{i}" for i in self.idx]

    def request(self, step: int, with_inputs: bool) -> tuple[pb.SelectRequest, np.ndarray]:
        learner = np.random.default_rng(step).gamma(2.0, 1.0, self.batch).astype(np.float32)
        req = pb.SelectRequest(model="digits", job_id="good", dataset="bench-digits", keys=self.keys,
                               n_select=self.n_select, seed=step)
        codec.encode(learner, req.learner.losses)
        if with_inputs:
            codec.encode_map(self.inputs, req.inputs)
        want = select(self.n_select, kind="per_example", learner=Losses(learner), reference=self.reference,
                      options=SelectOptions(), seed=step).indices
        return req, want


async def _good_calls(stub, job: GoodJob, calls: int, offset: int) -> tuple[list[float], int]:
    latencies, wrong = [], 0
    for step in range(offset, offset + calls):
        request, want = job.request(step, with_inputs=False)
        start = time.perf_counter()
        try:
            reply = await stub.Select(request, metadata=AUTH, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError:
            wrong += 1
            continue
        latencies.append((time.perf_counter() - start) * 1e3)
        wrong += int(list(reply.indices) != want.tolist())
    return latencies, wrong


def _malformed(rng: np.random.Generator, i: int) -> bytes:
    kind = i % 4
    if kind == 0:
        return rng.bytes(int(rng.integers(1, 4096)))
    req = pb.SelectRequest(model="digits" if kind != 3 else "nope", job_id=f"flood-{i % 7}", n_select=8)
    losses = np.full(256, np.nan, np.float32) if kind == 1 else np.ones(256, np.float32)
    codec.encode(losses, req.learner.losses)
    if kind == 2:
        req.learner.losses.dtype = pb.DT_INT64  # byte length no longer matches
    return req.SerializeToString()


async def _flood(target: str, stop, tasks: int) -> None:
    async def one(t: int) -> None:
        rng = np.random.default_rng(t)
        async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
            call = channel.unary_unary("/jest_stream.v1.Scorer/Select", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            i = 0
            while not stop.is_set():
                try:
                    await call(_malformed(rng, i), metadata=AUTH, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError:
                    pass
                i += 1
    await asyncio.gather(*(one(t) for t in range(tasks)))


async def _heavy(target: str, stop, batch: int) -> None:
    z = np.random.default_rng(0).standard_normal((2, batch, 1)).astype(np.float32)
    z /= np.abs(z)
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        stub = pb_grpc.ScorerStub(channel)

        async def job(j: int) -> None:
            req = pb.SelectRequest(model="pairs", job_id=f"heavy-{j}", n_select=batch, score="hard_learner",
                                   n_chunks=1024, seed=j)
            codec.encode(z[0], req.learner.image_embeds)
            codec.encode(z[1], req.learner.text_embeds)
            req.learner.logit_scale, req.learner.logit_bias = 8.0, -4.0
            while not stop.is_set():
                try:
                    await stub.Select(req, metadata=AUTH, timeout=120)
                except grpc.aio.AioRpcError:
                    pass
        await asyncio.gather(*(job(j) for j in range(4)))


async def _unauth(target: str, stop, megabytes: int) -> None:
    body = pb.SelectRequest(model="digits", job_id="intruder", inputs={"x": pb.Tensor(
        dtype=pb.DT_FLOAT32, shape=[megabytes << 18], data=b"\x01" * (megabytes << 20))}).SerializeToString()
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        call = channel.unary_unary("/jest_stream.v1.Scorer/Select", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        while not stop.is_set():
            await asyncio.gather(*(call(body, timeout=CALL_TIMEOUT) for _ in range(8)), return_exceptions=True)


ADVERSARIES = {"flood": _flood, "heavy": _heavy, "unauth": _unauth}


def _adversary(name: str, target: str, size: int, stop) -> None:
    """An adversary in a process of its own (so that its client work does not slow the good job's)."""
    asyncio.run(ADVERSARIES[name](target, stop, size))


class _Peak:
    def __init__(self, pid: int):
        import psutil

        self.process, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)


async def _phase(target: str, pid: int, job: GoodJob, calls: int, offset: int,
                 adversary: tuple[str, int] | None) -> dict[str, Any]:
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    peak = _Peak(pid)
    base = peak.process.memory_info().rss
    sampler = threading.Thread(target=peak.run, daemon=True)
    sampler.start()
    other = None
    if adversary:
        other = spawn.Process(target=_adversary, args=(adversary[0], target, adversary[1], stop), daemon=True)
        other.start()
        await asyncio.sleep(3.0)  # the adversary is up and at full strength
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        latencies, wrong = await _good_calls(pb_grpc.ScorerStub(channel), job, calls, offset)
    stop.set()
    if other:
        other.join(180)
        if other.is_alive():
            other.kill()
    peak.stop.set()
    sampler.join()
    lat = sorted(latencies) or [float("nan")]
    return {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "rss_growth_mb": max(0, peak.peak - base) / 2**20, "wrong": wrong}


async def _run(target: str, pid: int, job: GoodJob, args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:  # warm: keys cached
        request, _ = job.request(0, with_inputs=True)
        await pb_grpc.ScorerStub(channel).Select(request, metadata=AUTH, timeout=CALL_TIMEOUT)
    phases = {"alone": None, "flood": ("flood", args.flood_tasks), "heavy": ("heavy", args.heavy_batch),
              "unauth": ("unauth", args.unauth_mb)}
    out = {}
    for i, (name, adversary) in enumerate(phases.items()):
        out[name] = await _phase(target, pid, job, args.calls, 1 + i * args.calls, adversary)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the scorer, run the four phases, stop it; returns the figures."""
    from jest_stream.bench.soak import build_models

    x, y = load_digits_scaled()
    with tempfile.TemporaryDirectory(prefix="jest-isolation-") as tmp:
        paths = build_models(tmp, x, y)
        models = {"digits": paths["digits"], "pairs": paths["siglip"]}
        token = os.path.join(tmp, "token")
        with open(token, "w") as fh:
            fh.write(TOKEN)
        job = GoodJob(paths["digits"], x, y)
        scorer = start_scorer(models, os.path.join(tmp, "scorer.log"), "--token-file", token,
                              "--intra-op-threads", "1", "--max-message-bytes", str(512 << 20), timeout=120)
        try:
            phases = asyncio.run(_run(scorer.target, scorer.proc.pid, job, args))
        finally:
            scorer.stop()
    alone = phases["alone"]["p99"]
    result = {f"p99_{name}_ms": round(p["p99"], 2) for name, p in phases.items()}
    result.update({f"p50_{name}_ms": round(p["p50"], 2) for name, p in phases.items()})
    result["rss_growth_mb"] = round(max(p["rss_growth_mb"] for p in phases.values()), 1)
    result["rss_growth_by_phase_mb"] = {name: round(p["rss_growth_mb"], 1) for name, p in phases.items()}
    result["wrong_answers"] = sum(p["wrong"] for p in phases.values())
    result["heavy_batch"] = args.heavy_batch
    result["ratios"] = {name: round(p["p99"] / alone, 2) for name, p in phases.items() if name != "alone"}
    result["ok"] = result["wrong_answers"] == 0 and all(r <= 2.0 for r in result["ratios"].values())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from jest_stream.server.limits import RequestLimits

    p = argparse.ArgumentParser(prog="jest-stream bench isolation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--calls", type=int, default=100, help="good-job Selects per phase")
    p.add_argument("--flood-tasks", type=int, default=4, help="tasks sending malformed requests")
    p.add_argument("--heavy-batch", type=int, default=_heaviest_batch(RequestLimits().max_select_work),
                   help="B = b of the heavy jobs' requests (default: the heaviest the default limits allow)")
    p.add_argument("--unauth-mb", type=int, default=200, help="size of each unauthenticated request (MiB)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.flood_tasks < 1 or args.heavy_batch < 2 or args.unauth_mb < 1:
        p.error("--calls, --flood-tasks, --unauth-mb >= 1 and --heavy-batch >= 2")
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("alone", "flood", "heavy", "unauth"):
            print(f"{name:>7}: p50 {result[f'p50_{name}_ms']:8.2f} ms  p99 {result[f'p99_{name}_ms']:8.2f} ms  "
                  f"RSS +{result['rss_growth_by_phase_mb'][name]} MiB")
        print(f"wrong answers {result['wrong_answers']}; p99 ratios {result['ratios']} (target <= 2)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
