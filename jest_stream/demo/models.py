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


class TwoTower(nn.Module):
    """SigLIP-style two-tower model: image tower, "text" tower (a second view), and a
    learnable logit scale (log-parametrised) and bias, initialised as in SigLIP."""

    def __init__(self, hidden: int = 128, dim: int = 32, init_scale: float = 10.0,
                 init_bias: float = -10.0):
        super().__init__()
        self.image = Tower(hidden, dim)
        self.text = Tower(hidden, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

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
                    batch: int = 64, seed: int = 0) -> TwoTower:
    """Train a TwoTower on clean pairs with the sigmoid loss; returns it in eval mode."""
    gen = seed_everything(seed)
    model = TwoTower()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    it, tt = torch.from_numpy(image), torch.from_numpy(text)
    for _ in range(steps):
        idx = torch.randperm(it.shape[0], generator=gen)[:batch]
        zi, zt = model(it[idx], tt[idx])
        loss = sigmoid_loss(zi, zt, model.log_scale, model.bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
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
