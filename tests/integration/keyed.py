"""Shared by the framework tests: the digits as a keyed map-style Dataset, a small
learner, and a loop that trains on the next n sub-batches of a JESTLoader."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset


class KeyedDigits(Dataset):
    """Digits examples ``{"x", <label>, "__key__"}``: the first ``n`` of ``digits`` (the
    fixture's dict, or None to load scikit-learn's digits here, in a subprocess)."""

    def __init__(self, digits: dict | None = None, n: int = 640, label: str = "y", prefix: str = "digit"):
        if digits is None:
            from sklearn.datasets import load_digits

            data = load_digits()
            digits = {"x": (data.data / 16.0).astype(np.float32), "y": data.target.astype(np.int64)}
        self.x = torch.from_numpy(digits["x"][:n])
        self.y = torch.from_numpy(digits["y"][:n])
        self.label, self.prefix = label, prefix

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], self.label: self.y[i], "__key__": f"{self.prefix}-{i:05d}"}


def learner(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def train(loader, model: torch.nn.Module, opt: torch.optim.Optimizer, n: int,
          backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> list[list[str]]:
    """Train on the next ``n`` sub-batches (across epochs); return their keys."""
    seen: list[list[str]] = []
    while len(seen) < n:
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
            opt.zero_grad()
            backward(loss)
            opt.step()
            seen.append(batch["__key__"])
            if len(seen) == n:
                break
    return seen
