"""Per-request bounds, checked on the proto's shapes before any payload is decoded or any
work is spent: a small request must not ask for huge work.

Each bound is a server flag (``RequestLimits`` holds them); a request past one is
refused with RESOURCE_EXHAUSTED naming the limit, the value and the flag. Selection
work is estimated in "pair units" (about a nanosecond each on one core): the sigmoid
loss scores every candidate against every selected example (B·b pairs, each a d-wide
dot product and a softplus), the softmax loss first scores every pair of the
super-batch (B·B), and every chunk of the joint sampler passes over all B candidates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from jest_stream import codec
from jest_stream.options import DEFAULT_N_CHUNKS
from jest_stream.v1 import scorer_pb2 as pb

_PAIR = 48      # pair units of one (candidate, selected) pair beside its d-wide dot product
_PASS = 64      # pair units per candidate of one chunk's pass over the super-batch


class LimitExceeded(RuntimeError):
    """A request past a bound: RESOURCE_EXHAUSTED with a message naming the limit and flag."""


def host_memory_bytes() -> int:
    """Physical memory of this host (8 GiB if the OS will not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_inflight_bytes() -> int:
    """Request bytes in flight at once by default: a quarter of the host's memory, at most 4 GiB."""
    return min(4 << 30, host_memory_bytes() // 4)


def _dims(tensor: pb.Tensor) -> list[int]:
    """A tensor's shape if it is well formed (its bytes match dtype x shape), else [] (the
    decoder then refuses it with INVALID_ARGUMENT naming the field)."""
    shape = [int(n) for n in tensor.shape]
    try:
        itemsize = codec.numpy_dtype(tensor.dtype).itemsize
    except ValueError:
        return []
    count = 1
    for n in shape:
        count *= n
    return shape if shape and min(shape) >= 0 and count * itemsize == len(tensor.data) else []


def selection_work(kind: str, batch: int, n_select: int, width: int, n_chunks: int, sampler: str) -> int:
    """Estimated pair units of one selection (see the module docstring)."""
    if kind == "per_example":
        return batch * _PASS
    chunks = 1 if sampler != "joint" else max(1, min(n_chunks, n_select))
    pair = width + _PAIR
    work = chunks * batch * _PASS
    if kind == "softmax_contrastive":
        work += batch * batch * pair  # the whole super-batch as the first chunk's context
    if sampler != "uniform":
        work += batch * n_select * pair * (2 if kind == "softmax_contrastive" else 1)
    return work


@dataclass(frozen=True)
class RequestLimits:
    """The bounds every Select / Reference request is checked against (flags of ``serve``)."""

    max_examples: int = 65536
    max_embed_dim: int = 4096
    max_chunks: int = 1024
    max_select_work: int = 4_000_000_000

    def _over(self, what: str, value: int, limit: int, flag: str) -> None:
        if value > limit:
            raise LimitExceeded(f"{what}: {value} is over the limit {limit} (server flag {flag})")

    def check_rows(self, rows: int, field: str) -> None:
        self._over(f"{field} (examples B)", rows, self.max_examples, "--max-examples")

    def check_select(self, request: pb.SelectRequest, kind: str) -> int:
        """Check a Select's sizes from its headers; return its estimated selection work."""
        learner = request.learner
        shape = _dims(learner.losses if kind == "per_example" else learner.image_embeds)
        batch = int(shape[0]) if shape else 0
        width = int(shape[1]) if kind != "per_example" and len(shape) > 1 else 1
        self.check_rows(batch, "learner")
        self.check_rows(len(request.keys), "keys")
        for name, t in request.inputs.items():
            self.check_rows((_dims(t) or [0])[0], f"inputs[{name[:64]!r}]")
        if kind != "per_example":
            for field in ("image_embeds", "text_embeds"):
                dims = _dims(getattr(learner, field))
                if len(dims) > 1:
                    self._over(f"learner.{field} width d", int(dims[1]), self.max_embed_dim, "--max-embed-dim")
        n_chunks = int(request.n_chunks) or DEFAULT_N_CHUNKS
        self._over("n_chunks", n_chunks, self.max_chunks, "--max-chunks")
        work = selection_work(kind, batch, int(request.n_select), width, n_chunks, request.sampler or "joint")
        self._over(f"selection work (B={batch}, b={request.n_select}, d={width}, n_chunks={n_chunks})",
                   work, self.max_select_work, "--max-select-work")
        return work

    def check_reference(self, request: pb.ReferenceRequest) -> None:
        """Check a Reference request's row counts from its headers."""
        self.check_rows(len(request.keys), "keys")
        for name, t in request.inputs.items():
            self.check_rows((_dims(t) or [0])[0], f"inputs[{name[:64]!r}]")
