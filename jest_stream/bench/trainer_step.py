"""``jest-stream bench trainer-step``: the trainer-side selection step (``select_on="trainer"``).

One step of a JESTLoader that selects on the trainer, minus the learner's forward pass:
the super-batch's reference outputs arrive as host arrays (from the scorer's Reference
call, or from the batch's ``jest.*`` fields, which is the path timed here: no scorer
process is needed), are moved to the learner's device, and the core's ``select`` runs
there on the learner's embeddings. For each kind it reports, side by side:

- ``step_ms``: the whole step (read the batch's fields, copy to the device, select);
- ``copy_ms``: the reference outputs' host-to-device copy alone.

Needs only torch and numpy (the device image's packages). ``trainer_step_cases`` is
the function other benchmarks (``jest-stream bench gpu``) call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import numpy as np

KINDS = ("sigmoid_contrastive", "softmax_contrastive")


def _unit(z: np.ndarray) -> np.ndarray:
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def _batch_fields(kind: str, zi: np.ndarray, zt: np.ndarray, scale: float, bias: float) -> dict:
    """A super-batch's reference fields as WebDataset yields them after batching."""
    size = zi.shape[0]
    return {"jest.version.txt": ["bench"] * size, "jest.kind.txt": [kind] * size,
            "jest.logit_scale.txt": [repr(scale)] * size, "jest.logit_bias.txt": [repr(bias)] * size,
            "jest.image_embeds.npy": zi, "jest.text_embeds.npy": zt}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, repeats: int, device) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def trainer_step_case(kind: str, batch: int, dim: int, filter_ratio: float = 0.8, device: str = "cpu",
                      repeats: int = 3, n_chunks: int = 16, seed: int = 0) -> dict:
    """Time one trainer-side selection step for ``kind`` at B=``batch``, width ``dim``."""
    import torch

    from jest_stream.client.batch_reference import BatchReference
    from jest_stream.client.scorer import SelectCall
    from jest_stream.client.trainer_select import TrainerSelect
    from jest_stream.options import SelectOptions
    from jest_stream.outputs import Embeddings

    dev = torch.device(device)
    rng = np.random.default_rng(seed)
    scale, bias = (10.0, -10.0) if kind == "sigmoid_contrastive" else (10.0, 0.0)
    ref_i = _unit(rng.standard_normal((batch, dim), dtype=np.float32))
    ref_t = _unit(ref_i + rng.standard_normal((batch, dim), dtype=np.float32))
    fields = _batch_fields(kind, ref_i, ref_t, scale, bias)
    learner = Embeddings(torch.from_numpy(_unit(ref_i + 0.5 * rng.standard_normal((batch, dim),
                                                                              dtype=np.float32))).to(dev),
                         torch.from_numpy(_unit(ref_t + 0.5 * rng.standard_normal((batch, dim),
                                                                              dtype=np.float32))).to(dev),
                         scale, bias)
    n_select = max(1, int(round((1.0 - filter_ratio) * batch)))
    source = BatchReference(name="bench")
    selector = TrainerSelect(source)
    options = SelectOptions(n_chunks=n_chunks)

    def step():
        outputs = source.read(fields, batch)
        return selector.select(SelectCall("bench", "bench", learner, n_select, options=options, seed=seed),
                               outputs)

    def copy():
        return [torch.from_numpy(a).to(dev) for a in (ref_i, ref_t)]

    return {"kind": kind, "device": str(dev), "B": batch, "b": n_select, "d": dim,
            "step_ms": round(_median_ms(step, repeats, dev), 3),
            "copy_ms": round(_median_ms(copy, repeats, dev), 3)}


def trainer_step_cases(sizes: Sequence[int] = (16384,), dim: int = 768, device: str = "cpu",
                       kinds: Sequence[str] = KINDS, repeats: int = 3, filter_ratio: float = 0.8) -> list[dict]:
    """The trainer-side step for every kind and size (what ``jest-stream bench gpu`` reports)."""
    return [trainer_step_case(kind, batch, dim, filter_ratio, device, repeats)
            for batch in sizes for kind in kinds]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jest-stream bench trainer-step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096], help="super-batch sizes B (default 4096)")
    parser.add_argument("--dim", type=int, default=256, help="embedding width d (default 256)")
    parser.add_argument("--device", default="cpu", help="the learner's torch device (default cpu; e.g. cuda)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="loss kinds")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device here")
    cases = trainer_step_cases(args.sizes, args.dim, args.device, args.kinds, args.repeats)
    if args.json:
        print(json.dumps({"cases": cases}))
    else:
        print(f"{'kind':<20} {'device':>7} {'B':>7} {'b':>6} {'d':>5} {'step_ms':>9} {'copy_ms':>8}")
        for c in cases:
            print(f"{c['kind']:<20} {c['device']:>7} {c['B']:>7} {c['b']:>6} {c['d']:>5} "
                  f"{c['step_ms']:>9.1f} {c['copy_ms']:>8.2f}")
    return 0
