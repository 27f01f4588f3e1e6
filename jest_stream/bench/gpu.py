"""``jest-stream bench gpu``: paper-scale joint selection on an accelerator, beside its floor.

For sigmoid and softmax contrastive scores at f = 0.8, d = 768 and super-batches
B = 16,384, 65,536 and 163,840, it times ``select(..., sampler="joint")`` on torch
(CUDA) and on CuPy, each beside ``floor_ms``, the matmuls that selection cannot avoid
timed on the same device (see ``jest_stream.bench.selection.floor_fn``), and numpy on
the host at B = 16,384 for comparison. It needs only numpy, torch and/or CuPy, and
array-api-compat on the path (pure Python: ``PYTHONPATH=array_api_compat-*.whl`` does);
the package itself may be installed with ``--no-deps``. ``--budget-s`` (default 420)
skips the cases left once it is spent, so one run stays under 8 minutes.

``--device cpu --backends torch --sizes 512`` runs the same code on the CPU in seconds
(the tests do), so the command cannot rot where there is no GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jest_stream.bench.selection import floor_fn, limit_threads, median_ms, shape_parser, synchronize
from jest_stream.options import SelectOptions
from jest_stream.outputs import Embeddings
from jest_stream.selection import select

KINDS = ("sigmoid_contrastive", "softmax_contrastive")


def device_embeddings(backend: str, device: str, batch: int, dim: int, seed: int,
                      noise: float = 1.0, scale: float = 10.0, bias: float = -10.0) -> Embeddings:
    """Unit-norm float32 image/text embeddings made on the device itself (text a noisy view)."""
    if backend == "numpy":
        rng = np.random.default_rng(seed)
        zi = rng.standard_normal((batch, dim), dtype=np.float32)
        zt = zi + noise * rng.standard_normal((batch, dim), dtype=np.float32)
        norm = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    elif backend == "torch":
        import torch
        gen = torch.Generator(device=device).manual_seed(seed)
        zi = torch.randn(batch, dim, generator=gen, device=device)
        zt = zi + noise * torch.randn(batch, dim, generator=gen, device=device)
        norm = lambda z: z / torch.linalg.vector_norm(z, dim=1, keepdim=True)  # noqa: E731
    else:
        import cupy
        rs = cupy.random.RandomState(seed)
        zi = rs.standard_normal((batch, dim), dtype=cupy.float32)
        zt = zi + noise * rs.standard_normal((batch, dim), dtype=cupy.float32)
        norm = lambda z: z / cupy.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    return Embeddings(norm(zi), norm(zt), scale, bias)


def run_case(backend: str, device: str, kind: str, batch: int, dim: int, filter_ratio: float,
             n_chunks: int, repeats: int, lookahead: str = "none") -> dict:
    """Time one (backend, kind, B): joint selection and its floor, medians in ms."""
    n_select = max(1, round((1.0 - filter_ratio) * batch))
    learner = device_embeddings(backend, device, batch, dim, seed=1)
    reference = device_embeddings(backend, device, batch, dim, seed=2, noise=0.5)
    synchronize(learner.image)

    def ours() -> Any:
        got = select(n_select, kind=kind, learner=learner, reference=reference,
                     options=SelectOptions(sampler="joint", n_chunks=n_chunks, lookahead=lookahead), seed=1)
        synchronize(learner.image)
        return got

    floor = floor_fn(kind, (learner, reference), n_select, n_chunks, np.random.default_rng(0), lookahead)
    ms = median_ms(ours, repeats)
    floor_ms = median_ms(floor, repeats)
    return {"backend": backend, "device": device if backend == "torch" else backend, "kind": kind,
            "B": batch, "b": n_select, "d": dim, "n_chunks": n_chunks, "lookahead": lookahead, "ms": round(ms, 2),
            "floor_ms": round(floor_ms, 2), "vs_floor": round(ms / floor_ms, 3)}


def plan(backends: Sequence[str], sizes: Sequence[int], host_size: int) -> list[tuple[str, str, int]]:
    """(backend, kind, B) cases in run order: smallest first, the host case last."""
    cases = [(be, kind, batch) for batch in sorted(sizes) for be in backends for kind in KINDS]
    if host_size:
        cases += [("numpy", kind, host_size) for kind in KINDS]
    return cases


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = shape_parser("jest-stream bench gpu", __doc__, [16384, 65536, 163840], 768, 3)
    parser.add_argument("--backends", default="torch,cupy",
                        help="comma list of device libraries: torch, cupy (default both)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--host-size", type=int, default=16384,
                        help="B for the numpy comparison on the host (0: skip; default 16384)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the cases left after this many seconds (default 420)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    bad = [n for n in names if n not in ("torch", "cupy")]
    if bad or not names:
        parser.error(f"--backends: unknown {bad or args.backends!r}; expected a comma list of torch, cupy")
    args.backends = names
    return args


def _trainer_step(args: argparse.Namespace, start: float, skipped: list) -> list[dict]:
    """The trainer-side selection step (select_on="trainer") on the torch device, at the
    smallest size, while the budget lasts (jest_stream.bench.trainer_step)."""
    if "torch" not in args.backends:
        return []
    if time.monotonic() - start >= args.budget_s:
        skipped.append({"backend": "torch", "kind": "trainer_step", "B": min(args.sizes),
                        "why": "time budget spent"})
        return []
    from jest_stream.bench.trainer_step import trainer_step_cases

    steps = trainer_step_cases((min(args.sizes),), args.dim, args.device, repeats=args.repeats,
                               filter_ratio=args.filter_ratio)
    if not args.json:
        for c in steps:
            print(f"trainer step {c['kind']:<20} B={c['B']:>7} on {c['device']}: {c['step_ms']:.1f} ms "
                  f"(reference copy {c['copy_ms']:.2f} ms)", flush=True)
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    limiter = limit_threads(args.threads, args.backends)  # noqa: F841 (held for the run)
    start = time.monotonic()
    cases, skipped = [], []
    for backend, kind, batch in plan(args.backends, args.sizes, args.host_size):
        if time.monotonic() - start >= args.budget_s:
            skipped.append({"backend": backend, "kind": kind, "B": batch, "why": "time budget spent"})
            continue
        try:
            cases.append(run_case(backend, args.device, kind, batch, args.dim, args.filter_ratio,
                                  args.chunks, 1 if backend == "numpy" else args.repeats, args.lookahead))
        except ImportError as exc:  # that library is not installed here: say so, go on
            skipped.append({"backend": backend, "kind": kind, "B": batch, "why": str(exc)})
        if not args.json and cases:
            c = cases[-1]
            print(f"{c['backend']:>6} {c['kind']:<20} B={c['B']:>7} b={c['b']:>6} "
                  f"{c['ms']:>10.1f} ms  floor {c['floor_ms']:>10.1f} ms  x{c['vs_floor']:.2f}", flush=True)
    result = {"cases": cases, "skipped": skipped, "trainer_step": _trainer_step(args, start, skipped),
              "wall_s": round(time.monotonic() - start, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        for s in skipped:
            print(f"skipped {s['backend']} {s['kind']} B={s['B']}: {s['why']}")
    return 0
