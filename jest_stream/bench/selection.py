"""``jest-stream bench selection``: how fast joint selection is against what it cannot avoid.

For each super-batch size B (f = 0.8, d = 256, 16 chunks, sigmoid_contrastive) it
times, side by side in one run:

- ``ms``: ``select(..., sampler="joint")`` (median of runs);
- ``floor_ms``: the plain numpy matmuls the selection cannot avoid: both models' B x b x d
  row and column products, computed chunk by chunk (B x |C| x d each) as any sequential
  sampler must, since chunk t+1 depends on chunk t; nothing else;
- ``floor_fused_ms``: the same products as four single B x b x d matmuls, a lower bound
  no chunked sampler reaches (it ignores that chunks come one after another);
- ``naive_ms``: a direct implementation that builds the full B x B score matrix.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from jest_stream.samplers import chunk_sizes, gumbel_topk
from jest_stream.outputs import Embeddings
from jest_stream.options import SelectOptions
from jest_stream.selection import select


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


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_case(batch: int, dim: int = 256, filter_ratio: float = 0.8, n_chunks: int = 16,
             repeats: int = 5, naive: bool = True, seed: int = 0) -> dict:
    """Time one super-batch size; returns the JSON case record."""
    rng = np.random.default_rng(seed)
    n_select = max(1, round((1.0 - filter_ratio) * batch))
    learner = make_embeddings(batch, dim, rng)
    reference = make_embeddings(batch, dim, rng, noise=0.5)

    def ours():
        select(n_select, kind="sigmoid_contrastive", learner=learner, reference=reference,
               options=SelectOptions(sampler="joint", n_chunks=n_chunks), seed=1)

    cols = rng.choice(batch, n_select, replace=False)
    sizes = chunk_sizes(n_select, n_chunks)
    chunks = np.split(cols, np.cumsum(sizes)[:-1])[:-1]  # no update after the last chunk

    def floor():
        for chunk in chunks:
            for m in (learner, reference):
                m.image @ m.text[chunk].T  # rows S[:, C]
                m.text @ m.image[chunk].T  # columns S[C, :]

    def floor_fused():
        for m in (learner, reference):
            m.image @ m.text[cols].T
            m.text @ m.image[cols].T

    record = {"B": batch, "b": n_select, "d": dim, "n_chunks": n_chunks,
              "ms": round(_median_ms(ours, repeats), 3),
              "floor_ms": round(_median_ms(floor, repeats), 3),
              "floor_fused_ms": round(_median_ms(floor_fused, repeats), 3)}
    if naive:
        record["naive_ms"] = round(_median_ms(
            lambda: naive_sigmoid_joint(learner, reference, n_select, n_chunks,
                                        np.random.default_rng(1)), max(1, repeats // 2)), 3)
    record["vs_floor"] = round(record["ms"] / record["floor_ms"], 3)
    record["vs_floor_fused"] = round(record["ms"] / record["floor_fused_ms"], 3)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jest-stream bench selection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="super-batch sizes B (default: 1024 4096 16384)")
    parser.add_argument("--dim", type=int, default=256, help="embedding width d (default 256)")
    parser.add_argument("--filter-ratio", type=float, default=0.8, help="f; b = (1-f) B (default 0.8)")
    parser.add_argument("--chunks", type=int, default=16, help="joint sampler chunks (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--no-naive", action="store_true", help="skip the B x B baseline")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 0.0 <= args.filter_ratio < 1.0:
        parser.error(f"--filter-ratio: must be in [0, 1), got {args.filter_ratio}")
    cases = []
    for batch in tqdm(args.sizes, desc="selection bench", disable=args.json):
        cases.append(run_case(batch, args.dim, args.filter_ratio, args.chunks, args.repeats,
                              naive=not args.no_naive))
    if args.json:
        print(json.dumps({"cases": cases}))
    else:
        print(f"{'B':>7} {'b':>6} {'ms':>9} {'floor_ms':>9} {'fused_ms':>9} {'naive_ms':>9} "
              f"{'vs floor':>8} {'vs fused':>8}")
        for c in cases:
            print(f"{c['B']:>7} {c['b']:>6} {c['ms']:>9.1f} {c['floor_ms']:>9.1f} "
                  f"{c['floor_fused_ms']:>9.1f} {c.get('naive_ms', float('nan')):>9.1f} "
                  f"{c['vs_floor']:>8.2f} {c['vs_floor_fused']:>8.2f}")
    return 0
