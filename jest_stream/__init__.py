"""jest-stream: online data curation (JEST joint example selection, RHO-LOSS) for PyTorch.

The core (this package) is numpy only: scores, samplers, the tensor codec and the
generated gRPC stubs. The trainer side lives in ``jest_stream.client`` and the shared
scorer in ``jest_stream.server``; the client's public names are re-exported here lazily,
so importing ``jest_stream`` never pulls in torch.
"""
from __future__ import annotations

import importlib

from jest_stream.samplers import SAMPLERS, chunk_sizes, gumbel_topk, joint, topk, uniform
from jest_stream.scores import LOSS_KINDS, SCORES, Embeddings, Losses
from jest_stream.selection import Selection, select

__version__ = "0.1.0"

# Public names of the trainer side, importable as jest_stream.<name> (needs the client extra).
_CLIENT_NAMES = (
    "JESTLoader",
    "LocalScorer",
    "RemoteScorer",
    "per_example_cross_entropy",
    "sigmoid_contrastive_embeddings",
    "softmax_contrastive_embeddings",
    "export_reference",
)

__all__ = [
    "LOSS_KINDS", "SAMPLERS", "SCORES", "Embeddings", "Losses", "Selection", "select",
    "chunk_sizes", "gumbel_topk", "joint", "topk", "uniform", *_CLIENT_NAMES,
]


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module("jest_stream.client"), name)
    raise AttributeError(f"module 'jest_stream' has no attribute {name!r}")
