"""``jest-stream bench wire``: what half-precision learner embeddings cost and change.

For a contrastive super-batch of B unit-norm embeddings (width d, f = 0.8) it reports:

- ``bytes``: the size of the SelectRequest RemoteScorer sends (keys only, no inputs) with
  the embeddings as float32, float16 and bfloat16, and the float16 / float32 ratio;
- ``overlap``: for each kind and wire dtype, the fraction of indices that a selection from
  the narrowed embeddings shares with the float32 one: ``topk`` (no noise: the most
  sensitive) and ``joint`` with the same seed (mean and min over seeds), beside
  ``other_seed``, the overlap of two float32 joint selections with different seeds (what
  the sampler's own randomness changes).

No scorer process: the request is built as RemoteScorer builds it, and the selections run
in this process, where the server would run them.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

from jest_stream import codec
from jest_stream.options import SelectOptions
from jest_stream.outputs import Embeddings
from jest_stream.selection import select

WIRES = ("float16", "bfloat16")
# (kind, logit scale, bias, joint gain): SigLIP-like and CLIP-like settings.
KINDS = (("sigmoid_contrastive", 10.0, -10.0, 10.0), ("softmax_contrastive", 10.0, 0.0, 100.0))


def _unit(z: np.ndarray) -> np.ndarray:
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def towers(batch: int, dim: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Reference image/text embeddings and a learner's, a noisy view of them."""
    rng = np.random.default_rng(seed)
    ref_i = _unit(rng.standard_normal((batch, dim)))
    ref_t = _unit(ref_i + 0.8 * rng.standard_normal((batch, dim)))
    return (ref_i, ref_t, _unit(ref_i + 0.5 * rng.standard_normal((batch, dim))),
            _unit(ref_t + 0.5 * rng.standard_normal((batch, dim))))


def request_bytes(image: np.ndarray, text: np.ndarray, n_select: int) -> dict[str, int]:
    """Bytes of one keys-only SelectRequest per wire dtype, built as RemoteScorer builds it."""
    from jest_stream.client.remote import RemoteScorer  # needs the client extra (grpc)
    from jest_stream.client.scorer import SelectCall

    call = SelectCall("clip", "job/rank0of1", Embeddings(image, text, 10.0, -10.0), n_select,
                      keys=[f"{i:08d}" for i in range(image.shape[0])], seed=1)
    return {dt: RemoteScorer("127.0.0.1:1", embeddings_dtype=dt).select_request(call, with_inputs=False).ByteSize()
            for dt in ("float32", *WIRES)}


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return len(np.intersect1d(a, b)) / len(a)


def overlaps(kind: str, scale: float, bias: float, gain: float, arrays: tuple[np.ndarray, ...],
             n_select: int, seeds: int) -> dict[str, dict[str, float]]:
    """Overlap of narrowed-wire selections with float32 ones, per wire dtype."""
    ref_i, ref_t, li, lt = arrays
    ref, full = Embeddings(ref_i, ref_t, scale, bias), Embeddings(li, lt, scale, bias)

    def pick(learner, sampler: str, seed: int = 0):
        options = SelectOptions(sampler=sampler, score_gain=gain)
        return select(n_select, kind=kind, learner=learner, reference=ref, options=options, seed=seed).indices

    base = {s: pick(full, "joint", s) for s in range(seeds)}
    other = float(np.mean([_overlap(base[s], pick(full, "joint", s + 1000)) for s in range(seeds)]))
    top = pick(full, "topk")
    out = {}
    for wire in WIRES:
        narrow = Embeddings(*(codec.decode(codec.encode(z, wire_dtype=wire)) for z in (li, lt)), scale, bias)
        joint = [_overlap(base[s], pick(narrow, "joint", s)) for s in range(seeds)]
        out[wire] = {"topk": _overlap(top, pick(narrow, "topk")), "joint_mean": float(np.mean(joint)),
                     "joint_min": float(np.min(joint)), "other_seed": other, "gain": gain}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jest-stream bench wire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16384, help="super-batch size B (default 16384)")
    parser.add_argument("--dim", type=int, default=256, help="embedding width d (default 256)")
    parser.add_argument("--seeds", type=int, default=3, help="joint selections per case (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    n_select = max(1, int(round(0.2 * args.batch)))
    arrays = towers(args.batch, args.dim)
    sizes = request_bytes(arrays[2], arrays[3], n_select)
    result = {"B": args.batch, "b": n_select, "d": args.dim, "bytes": sizes,
              "float16_over_float32": round(sizes["float16"] / sizes["float32"], 4),
              "overlap": {kind: overlaps(kind, scale, bias, gain, arrays, n_select, args.seeds)
                          for kind, scale, bias, gain in KINDS}}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"B={args.batch} d={args.dim}: bytes per Select float32 {sizes['float32']}, float16 "
          f"{sizes['float16']} ({result['float16_over_float32']:.4f}x), bfloat16 {sizes['bfloat16']}")
    for kind, by_wire in result["overlap"].items():
        for wire, o in by_wire.items():
            print(f"{kind:<20} {wire:<9} topk {o['topk']:.4f}  joint {o['joint_mean']:.4f} "
                  f"(min {o['joint_min']:.4f})  float32 other seed {o['other_seed']:.4f}  gain {o['gain']:g}")
    return 0
