"""Learner score helpers: the learner's forward-pass outputs -> what the scorer needs.

The JESTLoader calls the user's ``score_fn(super_batch)`` under ``torch.no_grad()``
with the learner's current parameters. ``score_fn`` may return ``Losses`` or
``Embeddings`` (jest_stream.outputs), or a 1-D tensor / array of per-example losses.
These helpers build the first two from logits or embeddings, one per loss kind:

- ``per_example_cross_entropy(logits, targets)``: classification (B, C) or token
  sequences (B, T, C), token-mean per example;
- ``sigmoid_contrastive_embeddings(zi, zt, logit_scale, logit_bias)``: SigLIP;
- ``softmax_contrastive_embeddings(zi, zt, logit_scale)``: CLIP.

``logit_scale`` is alpha itself (already exponentiated): for a CLIP-style parameter
``t`` that stores log alpha, pass ``t.exp()``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jest_stream.outputs import Embeddings, Losses

LearnerScores = Losses | Embeddings


def _numpy32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def _scalar(value: float | torch.Tensor, field: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{field}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().cpu().item())
    return float(value)


def per_example_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *,
                              ignore_index: int = -100) -> Losses:
    """Cross-entropy of each example, from logits (B, C) and class targets (B,).

    For sequences, logits (B, T, C) and targets (B, T) give each example's mean
    over its tokens, skipping ``ignore_index`` (padding); an example with no
    tokens scores 0.
    """
    if logits.dim() == 2:
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"targets: expected shape ({logits.shape[0]},) for logits "
                             f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
        losses = F.cross_entropy(logits.detach().float(), targets, reduction="none",
                                 ignore_index=ignore_index)
        return Losses(_numpy32(losses))
    if logits.dim() == 3:
        if targets.shape != logits.shape[:2]:
            raise ValueError(f"targets: expected shape {tuple(logits.shape[:2])} for logits "
                             f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
        per_token = F.cross_entropy(logits.detach().float().transpose(1, 2), targets,
                                    reduction="none", ignore_index=ignore_index)
        counted = (targets != ignore_index).sum(dim=1).clamp(min=1)
        return Losses(_numpy32(per_token.sum(dim=1) / counted))
    raise ValueError(f"logits: expected shape (B, C) or (B, T, C), got {tuple(logits.shape)}")


def _embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: float,
                bias: float, normalize: bool) -> Embeddings:
    for name, z in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if z.dim() != 2:
            raise ValueError(f"{name}: expected shape (B, d), got {tuple(z.shape)}")
    zi, zt = image_embeds.detach().float(), text_embeds.detach().float()
    if normalize:
        zi, zt = F.normalize(zi, dim=-1), F.normalize(zt, dim=-1)
    return Embeddings(_numpy32(zi), _numpy32(zt), scale, bias)


def sigmoid_contrastive_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                                   logit_scale: float | torch.Tensor,
                                   logit_bias: float | torch.Tensor = 0.0, *,
                                   normalize: bool = True) -> Embeddings:
    """SigLIP learner outputs: image/text embeddings (B, d), alpha and beta.

    Embeddings are L2-normalised unless ``normalize=False`` (as SigLIP does before
    its logits alpha * zi . zt + beta).
    """
    return _embeddings(image_embeds, text_embeds, _scalar(logit_scale, "logit_scale"),
                       _scalar(logit_bias, "logit_bias"), normalize)


def softmax_contrastive_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                                   logit_scale: float | torch.Tensor, *,
                                   normalize: bool = True) -> Embeddings:
    """CLIP learner outputs: image/text embeddings (B, d) and alpha (no bias).

    Embeddings are L2-normalised unless ``normalize=False``.
    """
    return _embeddings(image_embeds, text_embeds, _scalar(logit_scale, "logit_scale"), 0.0,
                       normalize)


def _all_finite(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return bool(np.all(np.isfinite(x)))


def all_finite(learner: LearnerScores) -> bool:
    """True if the learner's scores (numpy or torch, on any device) hold no NaN or inf."""
    if isinstance(learner, Losses):
        return _all_finite(learner.values)
    return (_all_finite(learner.image) and _all_finite(learner.text)
            and bool(np.isfinite(learner.logit_scale)) and bool(np.isfinite(learner.logit_bias)))


def on_host(learner: LearnerScores) -> LearnerScores:
    """The learner's scores as host numpy arrays (torch tensors on any device copied off it),
    as a scorer-side selection sends them; numpy arrays pass as they are."""
    if isinstance(learner, Losses):
        v = learner.values
        return Losses(v.detach().cpu().numpy()) if isinstance(v, torch.Tensor) else learner
    if not isinstance(learner.image, torch.Tensor) and not isinstance(learner.text, torch.Tensor):
        return learner
    zi, zt = (_numpy32(z) if isinstance(z, torch.Tensor) else z for z in (learner.image, learner.text))
    return Embeddings(zi, zt, learner.logit_scale, learner.logit_bias)


def as_learner_scores(value: Any) -> LearnerScores:
    """What a ``score_fn`` returned, as Losses or Embeddings.

    Accepts Losses, Embeddings, or a 1-D tensor/array of per-example losses.
    """
    if isinstance(value, (Losses, Embeddings)):
        return value
    if isinstance(value, torch.Tensor):
        value = _numpy32(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"score_fn: a tensor result must be per-example losses of shape (B,), "
                             f"got {value.shape}; return Embeddings for contrastive models")
        return Losses(value)
    raise TypeError(f"score_fn: returned {type(value).__name__}; return Losses, Embeddings or a "
                    "(B,) tensor of per-example losses (see per_example_cross_entropy)")
