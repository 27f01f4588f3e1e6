"""The demo's contrastive benchmark: match each digit to its second view, some pairs mismatched.

A small two-tower model (image tower, "text" tower on the second view) learns with
SigLIP's sigmoid loss (``loss="sigmoid"``) or CLIP's softmax loss (``loss="softmax"``);
the reference, trained on clean pairs with the same loss, is exported as a
``sigmoid_contrastive`` or ``softmax_contrastive`` ONNX model (embeddings out, its
logit scale and bias in the metadata), so the scorer's joint sampler sees the pairwise
learnability. The metric is image-to-text top-1 retrieval among all pairs of the clean
test split.

Two configurations (``PRESETS``): ``small`` (one pair per digit, B = 160; the README's
table) and ``large`` (16 views of every digit, about 18,000 training pairs, B = 1280;
the batch sizes where joint selection is meant to matter).
"""
from __future__ import annotations

from functools import partial

import torch

from jest_stream.client.learner import sigmoid_contrastive_embeddings, softmax_contrastive_embeddings
from jest_stream.demo.data import Split, make_contrastive
from jest_stream.demo.models import TwoTower, retrieval_accuracy, train_two_tower, two_tower_loss
from jest_stream.demo.training import Task

KINDS = {"sigmoid": "sigmoid_contrastive", "softmax": "softmax_contrastive"}
# Each preset: how the data and the reference are made, and the TrainConfig defaults
# (score_gain None: the loss kind's default gain, jest_stream.options.DEFAULT_GAINS).
PRESETS: dict[str, dict] = {
    "small": dict(views=1, noise=0.3, reference_steps=150, reference_batch=64,
                  train=dict(steps=400, super_batch=160, lr=2e-3, score_gain=None, n_chunks=16,
                             eval_every=10)),
    "large": dict(views=16, noise=0.4, reference_steps=300, reference_batch=256,
                  train=dict(steps=300, super_batch=1280, lr=2e-3, score_gain=None, n_chunks=16,
                             eval_every=10)),
}
# A super-batch of at least this many pairs picks the large preset when none is named.
LARGE_FROM = 512


def preset_for(super_batch: int | None) -> str:
    """The preset a run gets when none is named: large from B = LARGE_FROM up."""
    return "large" if super_batch is not None and super_batch >= LARGE_FROM else "small"


def _train_reference(split: Split, seed: int, *, loss: str, steps: int, batch: int) -> torch.nn.Module:
    """The clean reference: a TwoTower trained on the clean held-out pairs with ``loss``."""
    return train_two_tower(split.fields["image"], split.fields["text"], steps=steps, batch=batch,
                           seed=seed, loss=loss)


def _export(model: TwoTower, path: str) -> str:
    """The reference as a contrastive ONNX model of its loss's kind: inputs image, text
    (B, 64) float32; outputs image_embeds, text_embeds (B, d); alpha and beta in the metadata."""
    from jest_stream.client.export import export_reference

    example = (torch.zeros(2, 64), torch.zeros(2, 64))
    export_reference(model, None, path, example_inputs=example, input_names=("image", "text"),
                     kind=KINDS[model.loss_kind], logit_scale=model.logit_scale,
                     logit_bias=model.logit_bias if model.loss_kind == "sigmoid" else 0.0)
    return path


def _score_fn(model: TwoTower):
    """The learner's embeddings and logit scale (and bias, sigmoid) on a super-batch."""
    def score(batch: dict):
        zi, zt = model(batch["image"], batch["text"])
        if model.loss_kind == "sigmoid":
            return sigmoid_contrastive_embeddings(zi, zt, model.log_scale.exp(), model.bias)
        return softmax_contrastive_embeddings(zi, zt, model.log_scale.exp())
    return score


def _loss(model: TwoTower, batch: dict) -> torch.Tensor:
    zi, zt = model(batch["image"], batch["text"])
    return two_tower_loss(model, zi, zt)


def _evaluate(model: TwoTower, test: dict) -> float:
    return retrieval_accuracy(model, test["image"], test["text"])


def task(loss: str = "sigmoid", preset: str = "small") -> Task:
    """The contrastive Task for ``loss`` (sigmoid, softmax) and ``preset`` (small, large)."""
    if loss not in KINDS:
        raise ValueError(f"loss: expected one of {', '.join(KINDS)}, got {loss!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    views = p["views"]
    suffix = "" if (loss, preset) == ("sigmoid", "small") else f"-{loss}-{preset}"
    return Task(
        name="contrastive",
        kind=KINDS[loss],
        metric="retrieval_accuracy",
        description=("digit / second-view pairs" if not suffix else
                     f"digit / second-view pairs, {views} views per digit, {loss} loss")
        + ", {noise:.0%} of training pairs mismatched",
        fields=("image", "text"),
        make_data=lambda noise, seed: make_contrastive(noise=noise, seed=seed, views=views),
        train_reference=partial(_train_reference, loss=loss, steps=p["reference_steps"],
                                batch=p["reference_batch"]),
        export=_export,
        new_learner=partial(TwoTower, loss=loss),
        score_fn=_score_fn,
        loss=_loss,
        evaluate=_evaluate,
        reference_train_examples=p["reference_steps"] * p["reference_batch"],
        defaults=dict(p["train"], noise=p["noise"]),
        file_suffix=suffix,
    )


TASK = task()
