"""Samplers: one function per selection rule, each returning indices into the super-batch.

- ``uniform``: b examples at random (the baseline, and the fallback when scoring fails).
- ``topk``: the b highest per-example scores (RHO-LOSS's rule, "independent selection").
- ``joint``: JEST's blocked sampling. Chunk 1 draws b/N examples without replacement
  with probability proportional to exp(gain * c_i) over the diagonal scores; each next
  chunk redraws from the candidates' scores conditioned on everything selected so far.
  "Without replacement, proportional to exp" is exactly Gumbel-top-k. Per-example
  scores never change between chunks, and N sequential Gumbel-top-(b/N) draws from
  fixed scores are the same distribution (Plackett-Luce without replacement) as one
  Gumbel-top-b draw, so there the N chunks are one draw: N times less work.

Randomness comes from one numpy Generator, in a fixed order (one ``gumbel(size=B)`` per
chunk; one in all for per-example scores), drawn on the host and moved to the scores'
device, so the same inputs and seed give the same indices on every machine and on
every array library (numpy, torch, CuPy).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import device as compat_device

from jest_stream import xp as xp_util
from jest_stream.conditional import ConditionalScores
from jest_stream.options import DEFAULT_N_CHUNKS, check_int


def check_sizes(batch_size: int, n_select: int) -> None:
    """Raise ValueError unless 1 <= n_select <= batch_size."""
    if isinstance(n_select, bool) or not isinstance(n_select, (int, np.integer)):
        raise ValueError(f"n_select: expected an integer, got {type(n_select).__name__}")
    if not 1 <= n_select <= batch_size:
        raise ValueError(
            f"n_select: must be between 1 and the super-batch size B={batch_size}, got {n_select}"
        )


def chunk_sizes(n_select: int, n_chunks: int) -> list[int]:
    """Split b into N chunks of b // N or one more, the larger ones first.

    The remainder is spread, never piled into one chunk: with b = 26 and N = 16 a last
    chunk of 11 would be drawn from scores that know nothing of its own members. With
    more chunks than examples, every chunk holds one example.
    """
    n = min(check_int(n_chunks, "n_chunks", 1), n_select)
    base, extra = divmod(n_select, n)
    return [base + 1] * extra + [base] * (n - extra)


def uniform(batch_size: int, n_select: int, rng: np.random.Generator) -> np.ndarray:
    """b distinct indices drawn uniformly at random."""
    check_sizes(batch_size, n_select)
    return rng.choice(batch_size, size=n_select, replace=False).astype(np.int64)


def topk(scores: Any, n_select: int) -> np.ndarray:
    """The indices of the b highest scores, highest first (ties: lower index first)."""
    check_sizes(scores.shape[0], n_select)
    _check_finite_scores(scores)
    host = xp_util.to_host(scores)
    return np.argsort(-host, kind="stable")[:n_select].astype(np.int64)


def gumbel_topk(logits: Any, k: int, rng: np.random.Generator, taken: Any = None) -> Any:
    """Sample k indices without replacement with probability proportional to exp(logits).

    ``logits`` may be any array the core supports; the Gumbel noise is drawn on the host
    (B float64s from ``rng``) and moved to the logits' device, so a seed gives the same
    draws everywhere. Indices where ``taken`` is True are never drawn. Returned in draw
    order, as int64 on the logits' device.
    """
    xp = xp_util.namespace(logits)
    noise = xp_util.from_host(rng.gumbel(size=logits.shape[0]), logits)
    perturbed = xp.astype(logits, xp.float64) + noise
    if taken is not None:
        perturbed = xp.where(taken, -xp.inf, perturbed)
    return xp.astype(xp_util.top_indices(perturbed, k), xp.int64)


def _check_finite_scores(c: Any) -> None:
    xp = xp_util.namespace(c)
    if not bool(xp.all(xp.isfinite(c))):
        raise ValueError("learner: scores overflowed to NaN or inf (logit_scale or embeddings too large); "
                         "send finite, reasonably scaled scores")


def joint(scores: ConditionalScores, n_select: int, rng: np.random.Generator,
          n_chunks: int = DEFAULT_N_CHUNKS, score_gain: float = 1.0) -> np.ndarray:
    """JEST's joint selection of b examples in N chunks from conditional scores.

    ``scores`` keeps c_i as a running vector: ``initial(b)`` before the first chunk and
    ``update(chunk)`` after each one (never after the last); what c_i counts (the
    selected set, and with lookahead the rest of the sub-batch) is the tracker's
    business. Scores that are not ``pairwise`` (per-example) take one Gumbel-top-b
    draw, the same distribution. The chunks are drawn where the scores live; the
    indices come back as numpy int64.
    """
    b = scores.batch_size
    check_sizes(b, n_select)
    sizes = chunk_sizes(n_select, n_chunks)
    if not getattr(scores, "pairwise", True):
        # Fixed scores: the chunks' sequential draws are one Plackett-Luce draw of b.
        c = score_gain * scores.initial(n_select)
        _check_finite_scores(c)
        return xp_util.to_host(gumbel_topk(c, n_select, rng)).astype(np.int64)
    c = scores.initial(n_select)
    xp = xp_util.namespace(c)
    taken = xp.zeros(b, dtype=xp.bool, device=compat_device(c))
    picked: list[np.ndarray] = []
    for step, size in enumerate(sizes):
        logits = score_gain * c
        _check_finite_scores(logits)
        chunk = gumbel_topk(logits, size, rng, taken)
        taken[chunk] = True
        picked.append(xp_util.to_host(chunk))
        if step + 1 < len(sizes):
            c = scores.update(chunk)
    return np.concatenate(picked).astype(np.int64)
