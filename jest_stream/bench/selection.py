"""``jest-stream bench selection``: how fast joint selection is against what it cannot avoid.

For each super-batch size B (f = 0.8, d = 256, 16 chunks, sigmoid_contrastive) and each
array library in ``--backend`` (numpy; torch, on ``--device``), it times, side by side
in one run:

- ``ms``: ``select(..., sampler="joint")`` (median of runs), with ``--lookahead``
  (default ``none``: JEST's rule as published; ``in_batch``, the library's default
  rule, adds one B x B x d pass per model);
- ``floor_ms``: the plain matmuls the selection cannot avoid: both models' B x b x d
  row and column products, computed chunk by chunk (B x |C| x d each) as any sequential
  sampler must, since chunk t+1 depends on chunk t, plus the whole-batch pass where the
  rule has one (softmax, lookahead); nothing else;
- ``floor_fused_ms``: the same products as four single B x b x d matmuls, a lower bound
  no chunked sampler reaches (it ignores that chunks come one after another);
- ``naive_ms``: a direct implementation that builds the full B x B score matrix (numpy only);
- ``vs_numpy``: for other backends, ``ms`` over numpy's ``ms`` at the same B.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jest_stream import xp as xp_util
from jest_stream.options import LOOKAHEADS, SelectOptions
from jest_stream.outputs import Embeddings
from jest_stream.samplers import chunk_sizes, gumbel_topk
from jest_stream.selection import select

BACKENDS = ("numpy", "torch", "cupy")


def make_embeddings(batch: int, dim: int, rng: np.random.Generator, scale: float = 10.0,
                    bias: float = -10.0, noise: float = 1.0) -> Embeddings:
    """Unit-norm image/text embeddings where text is a noisy view of image (SigLIP-like)."""
    zi = rng.standard_normal((batch, dim), dtype=np.float32)
    zt = zi + noise * rng.standard_normal((batch, dim), dtype=np.float32)
    zi /= np.linalg.norm(zi, axis=1, keepdims=True)
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    return Embeddings(zi, zt, scale, bias)


def naive_sigmoid_joint(learner: Embeddings, reference: Embeddings, n_select: int, n_chunks: int,
                        rng: np.random.Generator, score_gain: float = 1.0) -> np.ndarray:
    """JEST joint sampling on the full B x B sigmoid learnability matrix (the baseline)."""
    s = None
    for weight, m in ((1.0, learner), (-1.0, reference)):
        x = m.logit_scale * (m.image @ m.text.T) + m.logit_bias
        y = -np.ones_like(x)
        np.fill_diagonal(y, 1.0)
        term = weight * np.logaddexp(0.0, -y * x)
        s = term if s is None else s + term
    c = np.diag(s).astype(np.float64)
    taken = np.zeros(s.shape[0], dtype=bool)
    picked = []
    sizes = chunk_sizes(n_select, n_chunks)
    for step, size in enumerate(sizes):
        chunk = gumbel_topk(score_gain * c, size, rng, taken)
        taken[chunk] = True
        picked.append(chunk)
        if step + 1 < len(sizes):
            c = c + s[:, chunk].sum(axis=1) + s[chunk, :].sum(axis=0)
    return np.concatenate(picked)


def on_backend(emb: Embeddings, backend: str, device: str = "cpu") -> Embeddings:
    """``emb`` with its arrays moved to ``backend`` (numpy, torch on ``device``, cupy)."""
    if backend == "numpy":
        return emb
    if backend == "torch":
        import torch
        move = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    else:
        import cupy
        move = cupy.asarray
    return Embeddings(move(emb.image), move(emb.text), emb.logit_scale, emb.logit_bias)


def synchronize(x: Any) -> None:
    """Wait for the device work queued on ``x``'s device (a no-op on the host)."""
    if xp_util.on_host(x):
        return
    import array_api_compat as compat
    if compat.is_torch_array(x):
        import torch
        torch.cuda.synchronize(x.device)
    else:
        import cupy
        cupy.cuda.Device().synchronize()


def floor_fn(kind: str, models: Sequence[Embeddings], n_select: int, n_chunks: int,
             rng: np.random.Generator, lookahead: str = "none") -> Callable[[], None]:
    """The matmuls a chunked joint selection of ``kind`` cannot avoid, on the models' device:
    per chunk but the last, each model's B x |C| x d row and column products; for softmax
    or with lookahead also the whole-batch pass (B x B x d in row blocks), and for softmax,
    per chunk, the products with every member selected so far (the marginal gain's)."""
    batch = models[0].image.shape[0]
    cols = rng.choice(batch, n_select, replace=False)
    sizes = chunk_sizes(n_select, n_chunks)
    chunks = [xp_util.from_host(c, models[0].image) for c in np.split(cols, np.cumsum(sizes)[:-1])[:-1]]
    members = [xp_util.from_host(cols[:end], models[0].image) for end in np.cumsum(sizes)[:-1]]
    xp = xp_util.namespace(models[0].image)
    step = xp_util.block_rows(models[0].image, batch)

    whole_batch = kind == "softmax_contrastive" or lookahead == "in_batch"

    def floor() -> None:
        for m in models:
            if whole_batch:
                for start in range(0, batch, step):
                    m.image[start:start + step] @ m.text.T
            for chunk in chunks:
                xp.take(m.text, chunk, axis=0) @ m.image.T  # rows S[:, C]
                xp.take(m.image, chunk, axis=0) @ m.text.T  # columns S[C, :]
            if kind == "softmax_contrastive":
                for chosen in members:
                    for start in range(0, chosen.shape[0], step):
                        block = chosen[start:start + step]
                        xp.take(m.text, block, axis=0) @ m.image.T
                        xp.take(m.image, block, axis=0) @ m.text.T
        synchronize(models[0].image)
    return floor


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up, in ms."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_case(batch: int, dim: int = 256, filter_ratio: float = 0.8, n_chunks: int = 16,
             repeats: int = 5, naive: bool = True, seed: int = 0, backend: str = "numpy",
             device: str = "cpu", kind: str = "sigmoid_contrastive", lookahead: str = "none") -> dict:
    """Time one super-batch size on one backend; returns the JSON case record."""
    rng = np.random.default_rng(seed)
    n_select = max(1, round((1.0 - filter_ratio) * batch))
    host = (make_embeddings(batch, dim, rng), make_embeddings(batch, dim, rng, noise=0.5))
    learner, reference = (on_backend(m, backend, device) for m in host)

    def ours() -> None:
        select(n_select, kind=kind, learner=learner, reference=reference,
               options=SelectOptions(sampler="joint", n_chunks=n_chunks, lookahead=lookahead), seed=1)
        synchronize(learner.image)

    floor = floor_fn(kind, (learner, reference), n_select, n_chunks, rng, lookahead)
    record = {"backend": backend, "device": str(xp_util.device_of(learner.image)), "kind": kind,
              "B": batch, "b": n_select, "d": dim, "n_chunks": n_chunks, "lookahead": lookahead,
              "ms": round(median_ms(ours, repeats), 3),
              "floor_ms": round(median_ms(floor, repeats), 3)}
    if kind == "sigmoid_contrastive":
        cols = xp_util.from_host(rng.choice(batch, n_select, replace=False), learner.image)
        xp = xp_util.namespace(learner.image)

        def floor_fused() -> None:
            for m in (learner, reference):
                xp.take(m.text, cols, axis=0) @ m.image.T
                xp.take(m.image, cols, axis=0) @ m.text.T
            synchronize(learner.image)
        record["floor_fused_ms"] = round(median_ms(floor_fused, repeats), 3)
        record["vs_floor_fused"] = round(record["ms"] / record["floor_fused_ms"], 3)
    if naive and backend == "numpy" and kind == "sigmoid_contrastive" and lookahead == "none":
        record["naive_ms"] = round(median_ms(
            lambda: naive_sigmoid_joint(host[0], host[1], n_select, n_chunks,
                                        np.random.default_rng(1)), max(1, repeats // 2)), 3)
    record["vs_floor"] = round(record["ms"] / record["floor_ms"], 3)
    return record


def limit_threads(threads: int, backends: Sequence[str]) -> Any:
    """Cap BLAS (numpy) and torch intra-op threads at ``threads`` (0: leave them as they are);
    returns what keeps the BLAS cap alive (threadpoolctl's limiter), or None."""
    if threads <= 0:
        return None
    if "torch" in backends:
        import torch
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the dev extra's; without it numpy keeps its BLAS threads
        return None
    return threadpool_limits(threads)


def shape_parser(prog: str, doc: str | None, sizes: list[int], dim: int, repeats: int) -> argparse.ArgumentParser:
    """The flags both selection benchmarks share: sizes, width, ratio, chunks, repeats,
    threads and --json (a bad --filter-ratio is refused when parsed)."""
    def ratio(text: str) -> float:
        value = float(text)
        if not 0.0 <= value < 1.0:
            raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
        return value

    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=sizes,
                        help=f"super-batch sizes B (default: {' '.join(map(str, sizes))})")
    parser.add_argument("--dim", type=int, default=dim, help=f"embedding width d (default {dim})")
    parser.add_argument("--filter-ratio", type=ratio, default=0.8, help="f; b = (1-f) B (default 0.8)")
    parser.add_argument("--chunks", type=int, default=16, help="joint sampler chunks (default 16)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per case (default {repeats})")
    parser.add_argument("--threads", type=int, default=0,
                        help="cap numpy BLAS and torch CPU threads at N, the same for all (default: as they are)")
    parser.add_argument("--lookahead", choices=LOOKAHEADS, default="none",
                        help="the joint rule timed: none (JEST as published, the default here) or "
                             "in_batch (the library's default, one more B x B x d pass)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def parse_backends(text: str) -> list[str]:
    """``numpy,torch`` -> ["numpy", "torch"]; ValueError naming --backend on an unknown name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise ValueError(f"--backend: unknown {bad or text!r}; expected a comma list of {', '.join(BACKENDS)}")
    return names


def _print_table(cases: list[dict]) -> None:
    print(f"{'backend':>8} {'B':>7} {'b':>6} {'ms':>9} {'floor_ms':>9} {'fused_ms':>9} {'naive_ms':>9} "
          f"{'vs floor':>8} {'vs numpy':>8}")
    for c in cases:
        print(f"{c['backend']:>8} {c['B']:>7} {c['b']:>6} {c['ms']:>9.1f} {c['floor_ms']:>9.1f} "
              f"{c.get('floor_fused_ms', float('nan')):>9.1f} {c.get('naive_ms', float('nan')):>9.1f} "
              f"{c['vs_floor']:>8.2f} {c.get('vs_numpy', float('nan')):>8.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = shape_parser("jest-stream bench selection", __doc__, [1024, 4096, 16384], 256, 5)
    parser.add_argument("--backend", default="numpy",
                        help="comma list of array libraries to time: numpy, torch, cupy (default numpy)")
    parser.add_argument("--device", default="cpu", help="torch device for --backend torch (default cpu)")
    parser.add_argument("--kind", default="sigmoid_contrastive",
                        choices=["sigmoid_contrastive", "softmax_contrastive"], help="loss kind")
    parser.add_argument("--no-naive", action="store_true", help="skip the B x B baseline")
    args = parser.parse_args(argv)
    try:
        backends = parse_backends(args.backend)
    except ValueError as exc:
        parser.error(str(exc))
    from tqdm import tqdm  # here, so that the GPU bench imports this module without it

    limiter = limit_threads(args.threads, backends)  # noqa: F841 (held for the run)
    cases = []
    for batch in tqdm(args.sizes, desc="selection bench", disable=args.json):
        numpy_ms = None
        for backend in backends:
            case = run_case(batch, args.dim, args.filter_ratio, args.chunks, args.repeats,
                            naive=not args.no_naive, backend=backend, device=args.device, kind=args.kind,
                            lookahead=args.lookahead)
            if backend == "numpy":
                numpy_ms = case["ms"]
            elif numpy_ms:
                case["vs_numpy"] = round(case["ms"] / numpy_ms, 3)
            cases.append(case)
    if args.json:
        print(json.dumps({"cases": cases}))
    else:
        _print_table(cases)
    return 0
