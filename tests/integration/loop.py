"""Shared by the framework tests: a small learner and a loop that trains on the next n
sub-batches of a JESTLoader (the keyed digits come from ``support``)."""
from __future__ import annotations

from collections.abc import Callable

import torch


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
