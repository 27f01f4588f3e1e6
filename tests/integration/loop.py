"""Shared by the resume and framework tests: a small learner, a loop that trains on the
next n sub-batches of a JESTLoader, and ``Run``: what a training script rebuilds after a
restart (the keyed digits come from ``support``)."""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from jest_stream import JESTLoader, per_example_cross_entropy

B = 64  # b = 16 with filter_ratio 0.75


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


class Run:
    """A learner, its optimiser and a JESTLoader (filter_ratio 0.75, seed 5) over a freshly
    built ``loader_cls`` of B=64 (its generator freshly seeded with ``generator_seed``, or none)."""

    def __init__(self, data, scorer, *, shuffle: bool = True, loader_cls: Any = DataLoader,
                 generator_seed: int | None = 7):
        self.model = learner()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.5)
        generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        base = loader_cls(data, batch_size=B, shuffle=shuffle, generator=generator)
        self.loader = JESTLoader(base, self.score, scorer, filter_ratio=0.75, sampler="joint", seed=5)

    def score(self, batch):
        return per_example_cross_entropy(self.model(batch["x"]), batch["y"])

    def train(self, n: int) -> list[list[str]]:
        return train(self.loader, self.model, self.opt, n)

    def state_dict(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                              "loader": self.loader.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.loader.load_state_dict(state["loader"])
