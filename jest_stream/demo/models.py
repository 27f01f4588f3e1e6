"""The demo's models: a small MLP classifier and a small two-tower contrastive model.

The learner and the reference share an architecture; the reference is trained on the
small clean split and then frozen (exported to ONNX for the scorer).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from jest_stream.demo.data import N_CLASSES, N_PIXELS


class DigitMLP(nn.Module):
    """64 pixels -> hidden -> hidden -> 10 logits."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(N_PIXELS, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, N_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PerExampleCrossEntropy(nn.Module):
    """Loss module for the export helper: (logits, labels) -> cross-entropy per example."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none")


class Tower(nn.Module):
    """64 pixels -> hidden -> d, L2-normalised."""

    def __init__(self, hidden: int = 128, dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


CONTRASTIVE_LOSSES = ("sigmoid", "softmax")


class TwoTower(nn.Module):
    """Two-tower model: image tower, "text" tower (a second view), and a learnable logit
    scale (log-parametrised) and bias. ``loss="sigmoid"``: SigLIP's initialisation
    (scale 10, bias -10); ``loss="softmax"``: CLIP's (scale 1/0.07, no bias, kept at 0)."""

    def __init__(self, hidden: int = 128, dim: int = 32, init_scale: float | None = None,
                 init_bias: float = -10.0, loss: str = "sigmoid"):
        super().__init__()
        if loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"loss: expected one of {CONTRASTIVE_LOSSES}, got {loss!r}")
        self.loss_kind = loss
        self.image = Tower(hidden, dim)
        self.text = Tower(hidden, dim)
        scale = init_scale if init_scale is not None else (10.0 if loss == "sigmoid" else 1 / 0.07)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias) if loss == "sigmoid" else 0.0),
                                 requires_grad=loss == "sigmoid")

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(image), self.text(text)

    @property
    def logit_scale(self) -> float:
        return float(self.log_scale.detach().exp())

    @property
    def logit_bias(self) -> float:
        return float(self.bias.detach())


def sigmoid_loss(zi: torch.Tensor, zt: torch.Tensor, log_scale: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss of a batch: mean over images of sum_j -log sigmoid(y_ij * (a zi.zt + b))."""
    logits = log_scale.exp() * zi @ zt.T + bias
    y = 2.0 * torch.eye(zi.shape[0], device=zi.device) - 1.0
    return -F.logsigmoid(y * logits).sum() / zi.shape[0]


def softmax_loss(zi: torch.Tensor, zt: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss of a batch: the mean of the image->text and text->image cross-entropies."""
    logits = log_scale.exp() * zi @ zt.T
    target = torch.arange(zi.shape[0], device=zi.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def two_tower_loss(model: TwoTower, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """The model's own training loss (sigmoid or softmax) on a batch of embeddings."""
    if model.loss_kind == "sigmoid":
        return sigmoid_loss(zi, zt, model.log_scale, model.bias)
    return softmax_loss(zi, zt, model.log_scale)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (initial weights) and return a generator for data order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_classifier(x: np.ndarray, y: np.ndarray, *, steps: int = 300, lr: float = 3e-3,
                     weight_decay: float = 1e-4, batch: int = 64, seed: int = 0,
                     hidden: int = 128) -> DigitMLP:
    """Train a DigitMLP on (x, y) with Adam in mini-batches; returns it in eval mode (the
    reference model, trained on the small clean split)."""
    gen = seed_everything(seed)
    model = DigitMLP(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        idx = torch.randint(0, xt.shape[0], (batch,), generator=gen)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train_two_tower(image: np.ndarray, text: np.ndarray, *, steps: int = 300, lr: float = 3e-3,
                    batch: int = 64, seed: int = 0, loss: str = "sigmoid") -> TwoTower:
    """Train a TwoTower on clean pairs with its ``loss``; returns it in eval mode."""
    gen = seed_everything(seed)
    model = TwoTower(loss=loss)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    it, tt = torch.from_numpy(image), torch.from_numpy(text)
    for _ in range(steps):
        idx = torch.randperm(it.shape[0], generator=gen)[:batch]
        zi, zt = model(it[idx], tt[idx])
        value = two_tower_loss(model, zi, zt)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitMLP, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of a classifier."""
    was = model.training
    model.eval()
    acc = float((model(x).argmax(dim=1) == y).float().mean())
    model.train(was)
    return acc


@torch.no_grad()
def retrieval_accuracy(model: TwoTower, image: torch.Tensor, text: torch.Tensor) -> float:
    """Image-to-text top-1 retrieval: the share of images whose most similar text, among
    all texts of the set, is their own pair."""
    was = model.training
    model.eval()
    zi, zt = model(image, text)
    hits = (zi @ zt.T).argmax(dim=1) == torch.arange(zi.shape[0])
    model.train(was)
    return float(hits.float().mean())
