"""The demo's main task: classify handwritten digits whose training labels are partly flipped.

Learner and reference are the same small MLP; the reference learns from the small clean
split and is exported as a ``per_example`` ONNX model (cross-entropy per example, labels
as an input), so the scorer computes learnability = learner loss - reference loss.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from jest_stream.demo.data import Split, make_classification
from jest_stream.demo.models import DigitMLP, PerExampleCrossEntropy, accuracy, train_classifier
from jest_stream.demo.training import Task
from jest_stream.client.learner import per_example_cross_entropy

REFERENCE_STEPS = 200
REFERENCE_BATCH = 64


def train_reference(split: Split, seed: int) -> torch.nn.Module:
    """The clean reference: a DigitMLP trained on the clean held-out split."""
    return train_classifier(split.fields["x"], split.fields["y"], steps=REFERENCE_STEPS,
                            batch=REFERENCE_BATCH, seed=seed)


def export(model: torch.nn.Module, path: str) -> str:
    """The reference as a per_example ONNX model: inputs x (B, 64) float32, y (B,) int64;
    output loss (B,)."""
    from jest_stream.client.export import export_reference

    example = (torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
    export_reference(model, PerExampleCrossEntropy(), path, example_inputs=example,
                     input_names=("x", "y"), kind="per_example")
    return path


def score_fn(model: torch.nn.Module):
    """The learner's per-example cross-entropy on a super-batch (JESTLoader calls it
    under no_grad)."""
    def score(batch: dict):
        return per_example_cross_entropy(model(batch["x"]), batch["y"])
    return score


def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def evaluate(model: torch.nn.Module, test: dict) -> float:
    return accuracy(model, test["x"], test["y"])


TASK = Task(
    name="classification",
    metric="test_accuracy",
    description="digits, {noise:.0%} of training labels flipped",
    fields=("x", "y"),
    make_data=lambda noise, seed: make_classification(noise=noise, seed=seed),
    train_reference=train_reference,
    export=export,
    new_learner=DigitMLP,
    score_fn=score_fn,
    loss=loss,
    evaluate=evaluate,
    reference_train_examples=REFERENCE_STEPS * REFERENCE_BATCH,
    defaults=dict(steps=600, super_batch=160, sub_batch=32, lr=2e-3, score_gain=2.0, n_chunks=16,
                  eval_every=10),
)
