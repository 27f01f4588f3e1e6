"""The trainer side of jest-stream: JESTLoader, the scorers and the learner score helpers.

``JESTLoader`` wraps a DataLoader (or any iterable of super-batches) and yields
selected sub-batches; ``LocalScorer`` runs the reference model in-process,
``RemoteScorer`` asks the shared gRPC scoring server. ``export_reference`` (needs the
``local`` extra: onnx) is imported on first use.
"""
from __future__ import annotations

import importlib

from jest_stream.extras import require

require("torch", "jest_stream.client (the trainer side)", "client")
require("grpc", "jest_stream.client (the trainer side)", "client")

from jest_stream.client.distributed import shard  # noqa: E402 - after the extra check
from jest_stream.client.learner import (per_example_cross_entropy, sigmoid_contrastive_embeddings,
                                        softmax_contrastive_embeddings)
from jest_stream.client.loader import JESTLoader
from jest_stream.client.local import LocalScorer
from jest_stream.client.reference_watch import ReferenceWatch
from jest_stream.client.remote import RemoteScorer
from jest_stream.client.scorer import Scorer, ScorerError, ScorerRejected, ScorerUnavailable
from jest_stream.client.stats import LoaderStats
from jest_stream.contract import ModelSpec

__all__ = [
    "JESTLoader", "LoaderStats", "LocalScorer", "ModelSpec", "ReferenceWatch", "RemoteScorer", "Scorer", "ScorerError",
    "ScorerRejected", "ScorerUnavailable", "export_reference", "per_example_cross_entropy",
    "shard", "sigmoid_contrastive_embeddings", "softmax_contrastive_embeddings",
]


def __getattr__(name: str):
    if name == "export_reference":
        return importlib.import_module("jest_stream.client.export").export_reference
    raise AttributeError(f"module 'jest_stream.client' has no attribute {name!r}")
