"""jest-stream: online data curation (JEST joint example selection, RHO-LOSS) for PyTorch.

What users call: ``JESTLoader`` around their DataLoader, a scorer (``LocalScorer``
embedded, ``RemoteScorer`` shared), the learner score helpers, ``export_reference``
for the reference model, and the core's ``select()`` with its types. The core needs
numpy, protobuf, msgpack and tqdm; the trainer side (torch) lives in
``jest_stream.client`` and is imported on first use, so ``import jest_stream`` never
pulls in torch.
"""
from __future__ import annotations

import importlib

from jest_stream.options import SelectOptions
from jest_stream.outputs import LOSS_KINDS, Embeddings, Losses
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

__all__ = ["LOSS_KINDS", "Embeddings", "Losses", "SelectOptions", "Selection", "select", *_CLIENT_NAMES]


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module("jest_stream.client"), name)
    raise AttributeError(f"module 'jest_stream' has no attribute {name!r}")
