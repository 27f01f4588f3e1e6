"""The demo's contrastive benchmark: match each digit to its second view, some pairs mismatched.

A small two-tower model (image tower, "text" tower on the second view) learns with
SigLIP's sigmoid loss; the reference, trained on clean pairs, is exported as a
``sigmoid_contrastive`` ONNX model (embeddings out, its logit scale and bias in the
metadata), so the scorer's joint sampler sees the pairwise learnability matrix. The
metric is image-to-text top-1 retrieval among all pairs of the clean test split.
"""
from __future__ import annotations

import torch

from jest_stream.demo.data import Split, make_contrastive
from jest_stream.demo.models import TwoTower, retrieval_accuracy, sigmoid_loss, train_two_tower
from jest_stream.demo.training import Task
from jest_stream.client.learner import sigmoid_contrastive_embeddings

REFERENCE_STEPS = 150
REFERENCE_BATCH = 64


def train_reference(split: Split, seed: int) -> torch.nn.Module:
    """The clean reference: a TwoTower trained on the clean held-out pairs."""
    return train_two_tower(split.fields["image"], split.fields["text"], steps=REFERENCE_STEPS,
                           batch=REFERENCE_BATCH, seed=seed)


def export(model: TwoTower, path: str) -> str:
    """The reference as a sigmoid_contrastive ONNX model: inputs image, text (B, 64)
    float32; outputs image_embeds, text_embeds (B, d); alpha and beta in the metadata."""
    from jest_stream.client.export import export_reference

    example = (torch.zeros(2, 64), torch.zeros(2, 64))
    export_reference(model, None, path, example_inputs=example, input_names=("image", "text"),
                     kind="sigmoid_contrastive", logit_scale=model.logit_scale,
                     logit_bias=model.logit_bias)
    return path


def score_fn(model: TwoTower):
    """The learner's embeddings, logit scale and bias on a super-batch."""
    def score(batch: dict):
        zi, zt = model(batch["image"], batch["text"])
        return sigmoid_contrastive_embeddings(zi, zt, model.log_scale.exp(), model.bias)
    return score


def loss(model: TwoTower, batch: dict) -> torch.Tensor:
    zi, zt = model(batch["image"], batch["text"])
    return sigmoid_loss(zi, zt, model.log_scale, model.bias)


def evaluate(model: TwoTower, test: dict) -> float:
    return retrieval_accuracy(model, test["image"], test["text"])


TASK = Task(
    name="contrastive",
    metric="retrieval_accuracy",
    description="digit / second-view pairs, {noise:.0%} of training pairs mismatched",
    fields=("image", "text"),
    make_data=lambda noise, seed: make_contrastive(noise=noise, seed=seed),
    train_reference=train_reference,
    export=export,
    new_learner=TwoTower,
    score_fn=score_fn,
    loss=loss,
    evaluate=evaluate,
    reference_train_examples=REFERENCE_STEPS * REFERENCE_BATCH,
    defaults=dict(steps=400, super_batch=160, sub_batch=32, lr=2e-3, score_gain=1.0, n_chunks=16,
                  eval_every=10),
)
