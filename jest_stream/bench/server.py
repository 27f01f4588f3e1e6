"""``jest-stream bench server``: what serving the reference model costs and what sharing buys.

One run, side by side, against a real scorer process on loopback (``python -m
jest_stream.server``) serving a small MLP reference exported with our export helper:

- served_vs_inprocess: examples/s of Select with reference inference (every key new,
  B=4096; the client keeps 2 calls in flight, as a loader that prefetches does) /
  examples/s of the same ONNX Runtime session (same file, same thread count) run in this
  process on the same batches, with as many runs at once as the scorer has inference
  workers (the same inference parallelism on both sides). The two alternate round by round, so
  that load from elsewhere on the machine hits both alike.
- cache_hit_vs_echo: p50 latency of Select with every key cached (no inputs sent) / p50
  of a bare gRPC echo (grpc.aio on uvloop, same message limits) of the same request
  bytes. The two alternate call by call.
- concurrency_gain: aggregate examples/s with 8 concurrent jobs / with 1 job, every key
  new (each job keeps one call in flight, as a training loop does). The two alternate in
  segments, so that both meet the same cache size and the same load from elsewhere.
- fairness: max / min examples/s across the 8 jobs of that run.

Defaults: ORT with 1 intra-op thread per session and 2 inference workers in the scorer
(batches of one model run side by side, one per core on a 2-core host). Requests are
serialized before the clock starts (the keys part per call, appended to
the shared inputs part: protobuf merges concatenated messages), so the figures measure
the server, not the benchmark's own encoding.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from jest_stream import codec
from jest_stream.server.launch import scorer_process, stop_process
from jest_stream.server.portfile import BoundPorts, read_port_file, write_port_file
from jest_stream.v1 import scorer_pb2 as pb

log = logging.getLogger(__name__)

SELECT = "/jest_stream.v1.Scorer/Select"
ECHO = "/jest_stream.bench.Echo/Echo"
MODEL = "mlp"
MAX_MESSAGE = 256 << 20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
TARGETS = {"served_vs_inprocess": (">=", 0.9), "cache_hit_vs_echo": ("<=", 1.5),
           "concurrency_gain": (">=", 1.5), "fairness": ("<=", 1.25)}


# -- the echo server (a subprocess of the benchmark) -----------------------------------------

async def _echo_server(port_file: str) -> None:
    import grpc

    async def echo(request: bytes, context) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "jest_stream.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_port_file(port_file, BoundPorts(port))
    await server.wait_for_termination()


def _run_echo_server(port_file: str) -> None:
    try:
        import uvloop
        uvloop.run(_echo_server(port_file))
    except ImportError:
        asyncio.run(_echo_server(port_file))


# -- set-up -----------------------------------------------------------------------------------

def export_mlp(path: str, hidden: int, seed: int = 0) -> str:
    """A small MLP classifier 64 -> hidden -> hidden -> 10 with its per-example loss."""
    import torch

    from jest_stream.client.export import export_reference

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    export_reference(model, torch.nn.CrossEntropyLoss(reduction="none"), path,
                     example_inputs=(torch.rand(2, 64), torch.zeros(2, dtype=torch.long)), input_names=("x", "y"),
                     kind="per_example")
    return path


@contextlib.contextmanager
def _process(args: list[str], log_path: str) -> Iterator[subprocess.Popen]:
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc, timeout=30)


class Requests:
    """Serialized Select requests: one shared part (inputs, learner, sizes) and a fresh
    keys part per call."""

    def __init__(self, batch: int, n_select: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.batch = batch
        self.inputs = {"x": rng.random((batch, 64), dtype=np.float32), "y": rng.integers(0, 10, batch)}
        self.losses = rng.gamma(2.0, 1.0, batch).astype(np.float32)
        head = pb.SelectRequest(model=MODEL, n_select=n_select, seed=seed)
        codec.encode(self.losses, head.learner.losses)
        self.learner_part = head.SerializeToString()
        with_inputs = pb.SelectRequest()
        codec.encode_map(self.inputs, with_inputs.inputs)
        self.inputs_part = with_inputs.SerializeToString()
        self.counter = 0
        self._suffixes = [f"/{i}" for i in range(batch)]

    def keys(self, prefix: str) -> list[str]:
        self.counter += 1
        head = f"{prefix}/{self.counter}"
        return [head + s for s in self._suffixes]

    def new(self, job: str, keys: list[str] | None = None, with_inputs: bool = True) -> bytes:
        """A serialized request of job ``job``: fresh keys unless ``keys`` are given."""
        keys = keys if keys is not None else self.keys(job)
        tail = pb.SelectRequest(job_id=job, keys=keys).SerializeToString()
        return self.learner_part + (self.inputs_part if with_inputs else b"") + tail


# -- the measurements ---------------------------------------------------------------------------

async def _pipelined(select, bodies: list[bytes], inflight: int, batch: int) -> None:
    """Send ``bodies`` with up to ``inflight`` calls outstanding (a loader that prefetches)."""
    queue = list(reversed(bodies))

    async def lane():
        while queue:
            reply = await select(queue.pop())
            assert reply.cache_misses == batch

    await asyncio.gather(*(lane() for _ in range(inflight)))


async def _served_vs_inprocess(select, session, requests: Requests, rounds: int, calls: int,
                               inflight: int, parallel: int) -> dict:
    feed = {k: np.ascontiguousarray(v) for k, v in requests.inputs.items()}
    loop = asyncio.get_running_loop()
    served_s, local_s = [], []
    for r in range(rounds):
        bodies = [requests.new("served") for _ in range(calls)]
        start = time.perf_counter()
        # in-process: the same session, the same batches, as many runs at once as the scorer's
        # inference workers (so both sides get the same inference parallelism)
        left = [calls]

        async def runner():
            while left[0] > 0:
                left[0] -= 1
                await loop.run_in_executor(None, session.run, ["loss"], feed)

        await asyncio.gather(*(runner() for _ in range(parallel)))
        local_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        await _pipelined(select, bodies, inflight, requests.batch)
        served_s.append(time.perf_counter() - start)
    examples = requests.batch * calls * rounds
    served, local = examples / sum(served_s), examples / sum(local_s)
    return {"served_examples_per_s": round(served), "inprocess_examples_per_s": round(local),
            "ratio": served / local}


async def _cache_hit_vs_echo(select, echo, requests: Requests, calls: int) -> dict:
    keys = requests.keys("cached")
    await select(requests.new("cached", keys))                     # fill the cache
    hit = requests.new("cached", keys, with_inputs=False)
    for _ in range(5):                                             # warm both paths
        await select(hit)
        await echo(hit)
    # the same call with the topk sampler (a later field in the bytes overrides the earlier one)
    hit_topk = hit + pb.SelectRequest(sampler="topk").SerializeToString()
    hit_s, topk_s, echo_s = [], [], []
    for _ in range(calls):
        for body, times in ((hit, hit_s), (hit_topk, topk_s)):
            start = time.perf_counter()
            reply = await select(body)
            times.append(time.perf_counter() - start)
            assert reply.cache_hits == requests.batch and reply.cache_misses == 0
        start = time.perf_counter()
        await echo(hit)
        echo_s.append(time.perf_counter() - start)
    p50_hit, p50_topk, p50_echo = (statistics.median(t) for t in (hit_s, topk_s, echo_s))
    return {"request_bytes": len(hit), "select_p50_ms": round(p50_hit * 1e3, 3),
            "select_topk_p50_ms": round(p50_topk * 1e3, 3), "echo_p50_ms": round(p50_echo * 1e3, 3),
            "ratio": p50_hit / p50_echo, "ratio_topk": p50_topk / p50_echo}


async def _jobs(target: str, requests: Requests, n_jobs: int, seconds: float, calls_per_s: float) -> dict:
    """``n_jobs`` jobs, each on its own channel with one call in flight, all keys new.

    Requests are made before the clock starts, enough for ``calls_per_s`` (an estimate)
    with room to spare, so that making them does not take CPU from the scorer; any made
    during the run are counted in ``built_inline``.
    """
    import grpc

    jobs = [f"job{j}" for j in range(n_jobs)]
    per_job = min(int(seconds * calls_per_s * 1.5 / n_jobs) + 4, 1200 // n_jobs + 4)
    stock = {job: [requests.new(f"{job}-{n_jobs}") for _ in range(per_job)] for job in jobs}
    done = {job: 0 for job in jobs}
    inline = [0]
    stop = asyncio.Event()
    begin = asyncio.Event()

    async def job_loop(job: str) -> float:
        async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
            select = channel.unary_unary(SELECT, response_deserializer=pb.SelectResponse.FromString)
            await channel.channel_ready()
            await begin.wait()
            start = time.perf_counter()
            while not stop.is_set():
                if not stock[job]:
                    inline[0] += 1
                body = stock[job].pop() if stock[job] else requests.new(f"{job}-{n_jobs}")
                reply = await select(body, timeout=120)
                assert reply.cache_misses == requests.batch
                done[job] += requests.batch
            return time.perf_counter() - start

    tasks = [asyncio.create_task(job_loop(job)) for job in jobs]
    await asyncio.sleep(0.5)
    begin.set()
    await asyncio.sleep(seconds)
    stop.set()
    elapsed = await asyncio.gather(*tasks)
    return {"examples": done, "seconds": dict(zip(jobs, elapsed)), "built_inline": inline[0]}


async def _one_vs_many(target: str, requests: Requests, n_jobs: int, seconds: float, rounds: int,
                       calls_per_s: float) -> tuple[dict, dict]:
    """1 job and ``n_jobs`` jobs in alternating segments (``rounds`` of each, ``seconds`` in
    all per side), so that both see the same cache size and the same load from elsewhere."""
    sides: dict[int, dict] = {1: {}, n_jobs: {}}
    for _ in range(rounds):
        for n in (1, n_jobs):
            part = await _jobs(target, requests, n, seconds / rounds, calls_per_s)
            side = sides[n]
            side["built_inline"] = side.get("built_inline", 0) + part["built_inline"]
            for key in ("examples", "seconds"):
                totals = side.setdefault(key, {})
                for job, value in part[key].items():
                    totals[job] = totals.get(job, 0) + value
    out = []
    for n in (1, n_jobs):
        side = sides[n]
        rates = {job: side["examples"][job] / side["seconds"][job] for job in side["examples"]}
        out.append({"examples_per_s": sum(rates.values()), "per_job": rates, "built_inline": side["built_inline"]})
    return out[0], out[1]


async def _measure(args, target: str, echo_target: str, model_path: str) -> dict:
    import grpc
    import onnxruntime as ort

    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
    requests = Requests(args.batch, max(1, int(args.batch * (1 - args.filter_ratio))), seed=args.seed)
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel, \
            grpc.aio.insecure_channel(echo_target, options=OPTIONS) as echo_channel:
        select_call = channel.unary_unary(SELECT, response_deserializer=pb.SelectResponse.FromString)
        echo_call = echo_channel.unary_unary(ECHO)
        await asyncio.wait_for(echo_channel.channel_ready(), 120)  # the echo server starts alongside

        async def select(body):
            return await select_call(body, timeout=120)

        async def echo(body):
            return await echo_call(body, timeout=120)

        for _ in range(3):  # warm-up: sessions, channels, allocator
            await select(requests.new("warm"))
            session.run(["loss"], requests.inputs)
        served = await _served_vs_inprocess(select, session, requests, args.rounds, args.calls, args.inflight,
                                            args.inference_workers)
        cached = await _cache_hit_vs_echo(select, echo, requests, args.echo_calls)
    one, many = await _one_vs_many(target, requests, args.jobs, args.seconds, args.job_rounds,
                                   served["served_examples_per_s"] / requests.batch)
    per_job = list(many["per_job"].values())
    return {
        "served_vs_inprocess": round(served["ratio"], 3),
        "cache_hit_vs_echo": round(cached["ratio"], 3),
        "concurrency_gain": round(many["examples_per_s"] / one["examples_per_s"], 3),
        "fairness": round(max(per_job) / min(per_job), 3),
        "details": {
            "served_vs_inprocess": served,
            "cache_hit_vs_echo": cached,
            "jobs_1_examples_per_s": round(one["examples_per_s"]),
            f"jobs_{args.jobs}_examples_per_s": round(many["examples_per_s"]),
            f"jobs_{args.jobs}_per_job_examples_per_s": [round(r) for r in per_job],
            "requests_built_during_the_jobs_runs": one["built_inline"] + many["built_inline"],
        },
    }


def run(args: argparse.Namespace) -> dict:
    """Export the MLP, start the scorer and the echo server, measure, stop them."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="jest-bench-server-") as tmp:
        model_path = export_mlp(os.path.join(tmp, "mlp.onnx"), args.hidden, args.seed)
        flags = ["--max-message-bytes", str(MAX_MESSAGE), "--max-batch", str(args.max_batch),
                 "--max-delay-ms", str(args.max_delay_ms), "--log-level", "WARNING",
                 "--inference-workers", str(args.inference_workers)]
        if args.threads:
            flags += ["--intra-op-threads", str(args.threads)]
        echo_ports = os.path.join(tmp, "echo-ports.json")
        echo = [sys.executable, "-m", "jest_stream.bench.server", "--echo-server", echo_ports]
        echo_log = os.path.join(tmp, "echo.log")
        with scorer_process({MODEL: model_path}, os.path.join(tmp, "scorer.log"), *flags, timeout=120) as scorer, \
                _process(echo, echo_log) as echo_proc:
            echo_port = read_port_file(echo_ports, proc=echo_proc, timeout=120, log_path=echo_log).port
            result = _run_async(_measure(args, scorer.target, f"127.0.0.1:{echo_port}", model_path))
    result["config"] = {"batch": args.batch, "filter_ratio": args.filter_ratio, "sampler": "joint",
                        "mlp": f"64-{args.hidden}-{args.hidden}-10", "ort_intra_op_threads": args.threads or "default",
                        "jobs": args.jobs, "inference_workers": args.inference_workers,
                        "served_calls_in_flight": args.inflight, "seconds_per_jobs_run": args.seconds,
                        "job_rounds": args.job_rounds, "rounds": args.rounds,
                        "calls_per_round": args.calls, "cpus": os.cpu_count(),
                        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    result["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
    return result


def _run_async(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jest-stream bench server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--batch", type=int, default=4096, help="super-batch size B")
    p.add_argument("--filter-ratio", type=float, default=0.8, help="f: the sub-batch is (1-f)B")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the reference MLP")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: ORT's default), "
                   "the same for the scorer and the in-process session")
    p.add_argument("--inference-workers", type=int, default=2, help="the scorer's --inference-workers")
    p.add_argument("--inflight", type=int, default=2,
                   help="served_vs_inprocess: Select calls the client keeps in flight (2 = a prefetching loader)")
    p.add_argument("--rounds", type=int, default=6, help="alternating served/in-process rounds")
    p.add_argument("--calls", type=int, default=8, help="batches per round")
    p.add_argument("--echo-calls", type=int, default=200, help="cache-hit and echo calls (each)")
    p.add_argument("--jobs", type=int, default=8, help="concurrent jobs")
    p.add_argument("--seconds", type=float, default=6.0, help="time of the 1-job and of the N-job runs, each")
    p.add_argument("--job-rounds", type=int, default=3,
                   help="1-job and N-job runs alternate in this many segments each")
    p.add_argument("--max-batch", type=int, default=8192, help="the scorer's --max-batch")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="the scorer's --max-delay-ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--echo-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.job_rounds < 1:
        parser.error(f"--job-rounds: must be >= 1, got {args.job_rounds}")
    if args.echo_server:
        _run_echo_server(args.echo_server)
        return 0
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, (op, target) in TARGETS.items():
            print(f"{key:<22} {result[key]:>8.3f}   (target {op} {target})")
        print(json.dumps(result["details"], indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
