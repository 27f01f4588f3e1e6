"""The demo's training loop: one learner, one selection method, one seed, through JESTLoader.

A ``Task`` says what is learned (data, models, loss, learner scores, test metric); this
module runs it the way a user would: a DataLoader yields super-batches of B examples
(dicts with ``__key__`` and the model's input fields), JESTLoader picks b of them with
the given sampler, and the loop trains on what it yields. Steps are learner updates
(sub-batches); the test metric is evaluated every ``eval_every`` steps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from jest_stream.demo.data import DemoData, Split
from jest_stream.client.loader import JESTLoader
from jest_stream.options import SelectOptions


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run (shared by every method, so the comparison is fair);
    ``rule`` is the selection rule (learnability; its gain, chunks and lookahead), each
    method's run taking it with its own sampler."""

    steps: int
    super_batch: int
    sub_batch: int
    lr: float
    eval_every: int
    rule: SelectOptions

    @property
    def filter_ratio(self) -> float:
        return 1.0 - self.sub_batch / self.super_batch


@dataclass(frozen=True)
class Task:
    """What the demo learns. Each function is small and task-specific:

    ``make_data(noise, seed)``; ``train_reference(split, seed)`` (the clean reference
    model); ``export(model, path)`` (its ONNX file, via the project's export helper);
    ``new_learner()``; ``score_fn(model)`` -> the JESTLoader's learner score function;
    ``loss(model, batch)`` (the training loss of a sub-batch); ``evaluate(model, test)``
    (the test metric on a clean split's tensors). ``fields`` are the shard fields (the
    reference model's input names); ``reference_train_examples`` counts the examples the
    reference trained on (its one-off cost, 3F each); ``defaults`` the TrainConfig values
    (and the default ``noise``); ``file_suffix`` names a variant's files apart.
    """

    name: str
    metric: str
    description: str
    fields: tuple[str, ...]
    make_data: Callable[[float, int], DemoData]
    train_reference: Callable[[Split, int], torch.nn.Module]
    export: Callable[[torch.nn.Module, str], str]
    new_learner: Callable[[], torch.nn.Module]
    score_fn: Callable[[torch.nn.Module], Callable[[dict], Any]]
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    evaluate: Callable[[torch.nn.Module, dict], float]
    reference_train_examples: int = 0
    defaults: dict = field(default_factory=dict)
    kind: str = "per_example"  # the reference's loss kind
    file_suffix: str = ""  # tells apart the files (shards, model, PNG) of a task's variants


class SuperBatches(Dataset):
    """In-memory training samples indexed by a *list* of rows: ``ds[rows]`` is a whole
    collated batch (``__key__`` list + one tensor per field), as a DataLoader with a
    BatchSampler and ``batch_size=None`` asks for it (no per-sample collation)."""

    def __init__(self, keys: list[str], columns: dict[str, np.ndarray]):
        self.keys = list(keys)
        self.columns = {name: torch.from_numpy(np.ascontiguousarray(col)) for name, col in columns.items()}
        # The scorer's cache is per dataset: runs and jobs over these very samples (same
        # keys, same values, e.g. the same noise and seed) share it, others never do.
        digest = hashlib.sha256("\0".join(self.keys).encode())
        for name in sorted(self.columns):
            digest.update(name.encode() + self.columns[name].numpy().tobytes())
        self.dataset = f"demo-{digest.hexdigest()[:16]}"

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, rows: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(rows, dtype=torch.long)
        batch: dict[str, Any] = {"__key__": [self.keys[i] for i in rows]}
        batch.update({name: col.index_select(0, idx) for name, col in self.columns.items()})
        return batch


def super_batch_loader(dataset: SuperBatches, super_batch: int, seed: int) -> DataLoader:
    """A DataLoader of shuffled super-batches of ``super_batch`` examples (last partial
    one dropped), reshuffled every epoch from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(dataset, generator=gen), super_batch, drop_last=True)
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def test_tensors(split: Split, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A clean split's fields as tensors, for ``Task.evaluate``."""
    return {name: torch.from_numpy(np.ascontiguousarray(split.fields[name])) for name in names}


@dataclass
class RunResult:
    """One run: evaluated steps and metric values, share of corrupted examples trained
    on, wall-clock seconds and the loader's fallback count (should be 0)."""

    steps: list[int]
    values: list[float]
    corrupted_selected: float
    seconds: float
    fallbacks: int
    stats: dict


def train_run(task: Task, train: SuperBatches, corrupted: dict[str, bool], test: dict[str, torch.Tensor],
              scorer: Any, *, method: str, seed: int, config: TrainConfig, model_name: str | None = None,
              job: str | None = None) -> RunResult:
    """Train a fresh learner for ``config.steps`` steps on sub-batches chosen by ``method``
    (``uniform``, ``topk`` or ``joint``; the last two on learnability) and evaluate it
    every ``config.eval_every`` steps. Same seed, same initial weights and data order for
    every method. The job id is ``<job>-<method>-seed<seed>``, ``job`` by default from
    $JEST_JOB_ID (one per trainer sharing a scorer), else "demo"."""
    job = job or os.environ.get("JEST_JOB_ID") or "demo"
    torch.manual_seed(10_000 + seed)
    model = task.new_learner()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = JESTLoader(
        super_batch_loader(train, config.super_batch, seed), task.score_fn(model), scorer,
        model=model_name, n_select=config.sub_batch, seed=seed,
        options=dataclasses.replace(config.rule, sampler=method),
        job=f"{job}-{method}-seed{seed}", prefetch=True, dataset=train.dataset,
    )
    steps: list[int] = []
    values: list[float] = []
    n_corrupted = n_trained = 0
    step = 0
    started = time.perf_counter()
    while step < config.steps:
        for batch in loader:
            loss = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            keys = batch["__key__"]
            n_trained += len(keys)
            n_corrupted += sum(corrupted.get(k, False) for k in keys)
            if step % config.eval_every == 0 or step == config.steps:
                steps.append(step)
                values.append(task.evaluate(model, test))
            if step >= config.steps:
                break
    seconds = time.perf_counter() - started
    return RunResult(steps, values, n_corrupted / max(1, n_trained), seconds, loader.stats.fallbacks,
                     loader.stats.as_dict())
