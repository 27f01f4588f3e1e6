"""Faults: the scorer dies or stalls under a training job that must not notice more than it has to.

- SIGKILL mid-training (just as the learner has scored a super-batch, so the Select goes
  to a dead server), a restart on the same port: the client reconnects; across the
  fault every example of every super-batch is accounted for, selected or not, none is
  delivered twice, every step is either scored or a counted fallback, and the learner
  trains on every step.
- A server that answers slower than the deadline (SIGSTOP: connected, silent):
  DEADLINE_EXCEEDED becomes a counted fallback within the deadline, never a hung loop;
  ``fallback="raise"`` raises instead; after SIGCONT the job is scored again.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import KeyedDigits, digit_key
from torch.utils.data import DataLoader

from jest_stream import JESTLoader, RemoteScorer, per_example_cross_entropy
from jest_stream.client import ScorerUnavailable
from jest_stream.client.scorer import SelectCall
from jest_stream.outputs import Losses

N, B, FILTER = 640, 64, 0.75        # 10 super-batches per epoch, b = 16
b = round((1 - FILTER) * B)


class Recorded:
    """An iterable of super-batches that writes down the keys of each one it yields."""

    def __init__(self, loader):
        self.loader = loader
        self.keys: list[list[str]] = []

    def __iter__(self):
        for batch in self.loader:
            self.keys.append(list(batch["__key__"]))
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def learner(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def full_loss(model, data: KeyedDigits) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data.x), data.y))


def check_accounting(source: Recorded, delivered: list[list[str]], loader: JESTLoader, n: int) -> None:
    """Every example of every super-batch is accounted for, none is delivered twice."""
    steps = len(delivered)
    assert len(source.keys) >= steps  # the loader fetches one super-batch ahead
    for t, (whole, sub) in enumerate(zip(source.keys, delivered)):
        assert len(sub) == b, f"step {t}: {len(sub)} examples, expected {b}"
        assert len(set(sub)) == len(sub), f"step {t}: an example twice in one sub-batch"
        assert set(sub) <= set(whole), f"step {t}: examples that were not in its super-batch"
    per_epoch = n // B
    for epoch in range(steps // per_epoch):
        rows = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = [k for t in rows for k in source.keys[t]]
        assert sorted(seen) == sorted(digit_key(i) for i in range(n)), f"epoch {epoch}: examples lost"
        sent = [k for t in rows for k in delivered[t]]
        assert len(set(sent)) == len(sent), f"epoch {epoch}: an example delivered twice"
    s = loader.stats
    assert s.sub_batches == steps and s.scored + s.fallbacks == steps
    assert s.examples_seen == sum(len(k) for k in source.keys[:steps])
    assert s.examples_selected == sum(len(k) for k in delivered)
    assert sum(s.fallback_reasons.values()) == s.fallbacks


@pytest.mark.timeout(180)
def test_sigkill_mid_training_and_restart_on_the_same_port(start_server, per_example_model, digits):
    server = start_server({"digits": per_example_model})
    data = KeyedDigits(digits, N)
    source = Recorded(DataLoader(data, batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(0)))
    model = learner()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kill_at, restart_at = 7, 14         # steps (0-based) at which the scorer dies / comes back
    state = {"step": 0, "killed": False}

    def score(batch):
        if state["step"] == kill_at and not state["killed"]:
            server.stop(signal.SIGKILL)  # the learner has scored: this step's Select meets a dead server
            state["killed"] = True
        return per_example_cross_entropy(model(batch["x"]), batch["y"])

    delivered: list[list[str]] = []
    scored_at: list[int] = []           # stats.scored after each step
    moved: list[bool] = []              # did the learner's parameters change at each step
    start_loss = full_loss(model, data)
    with RemoteScorer(server.target, timeout=2.0, max_attempts=3, initial_backoff=0.05, max_backoff=0.2,
                      reconnect_backoff_max=0.5) as scorer:
        loader = JESTLoader(source, score, scorer, filter_ratio=FILTER, seed=3, retry_after=0.3)
        restarted = None
        for _epoch in range(12):
            for sub in loader:
                before = [p.detach().clone() for p in model.parameters()]
                loss = F.cross_entropy(model(sub["x"]), sub["y"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                moved.append(any(not torch.equal(p, q) for p, q in zip(model.parameters(), before)))
                delivered.append(list(sub["__key__"]))
                scored_at.append(loader.stats.scored)
                state["step"] += 1
                if kill_at < state["step"] < restart_at:
                    time.sleep(0.15)  # the outage lasts a while: several reconnection attempts
                elif restarted is not None and loader.stats.scored == scored_at[restart_at - 1]:
                    time.sleep(0.05)  # a training step takes time; reconnection backoff runs meanwhile
                if state["step"] == restart_at:
                    restarted = start_server({"digits": per_example_model}, port=server.port)
            # Stop at an epoch's end once the job has been scored again for a while.
            if restarted is not None and scored_at[-1] - scored_at[restart_at - 1] >= 8:
                break

    assert state["killed"] and restarted is not None
    stats = loader.stats
    assert scored_at[kill_at - 1] == kill_at, "steps before the fault were all scored"
    assert scored_at[restart_at - 1] == kill_at, "no step was scored while the scorer was dead"
    assert stats.fallbacks >= restart_at - kill_at and stats.fallback_reasons.get("scorer_unavailable", 0) >= 1
    assert scored_at[-1] - scored_at[restart_at - 1] >= 8, "the client did not reconnect"
    assert stats.fallbacks <= len(delivered) - kill_at - 8
    check_accounting(source, delivered, loader, N)
    assert all(moved), "the learner missed a step"
    assert full_loss(model, data) < start_loss
    assert restarted.metric("jest_calls_total", method="Select", code="OK") >= 8
    assert restarted.proc.poll() is None


@pytest.mark.timeout(120)
def test_a_server_slower_than_the_deadline_is_a_counted_fallback(start_server, per_example_model, digits):
    server = start_server({"digits": per_example_model})
    data = KeyedDigits(digits, N)
    model = learner()
    deadline = 0.5

    def score(batch):
        return per_example_cross_entropy(model(batch["x"]), batch["y"])

    rows = np.arange(B)
    call = SelectCall("digits", "slow", Losses(np.linspace(0, 1, B, dtype=np.float32)), b,
                      [digit_key(i) for i in rows], lambda: {"x": digits["x"][rows], "y": digits["y"][rows]},
                      seed=1)
    with RemoteScorer(server.target, timeout=deadline, max_attempts=1) as scorer, \
            RemoteScorer(server.target, timeout=deadline, max_attempts=1) as strict_scorer:
        loader = JESTLoader(DataLoader(data, batch_size=B), score, scorer, filter_ratio=FILTER, seed=3,
                            retry_after=0.2)
        strict = JESTLoader(DataLoader(data, batch_size=B), score, strict_scorer, filter_ratio=FILTER, seed=3,
                            fallback="raise")
        it, strict_it = iter(loader), iter(strict)
        for _ in range(2):
            next(it), next(strict_it)
        assert loader.stats.scored == 2 and strict.stats.scored == 2

        os.kill(server.proc.pid, signal.SIGSTOP)  # connected, but answers nothing
        try:
            with pytest.raises(ScorerUnavailable, match="DEADLINE_EXCEEDED"):
                scorer.select(call)
            with pytest.raises(ScorerUnavailable, match="DEADLINE_EXCEEDED.*fallback='raise'"):
                next(strict_it)
            during = []
            for _ in range(5):
                during.append(next(it))
                time.sleep(0.25)  # past retry_after: the loader tries the scorer again each time
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)  # the late answers arrive; no one is waiting

        stats = loader.stats
        assert all(len(sub["__key__"]) == b for sub in during)
        assert stats.scored == 2 and stats.fallbacks == 5
        assert stats.fallback_reasons.get("scorer_unavailable", 0) >= 2  # each a DEADLINE_EXCEEDED
        for _ in range(8):  # within one epoch (10 super-batches)
            if stats.scored > 2:
                break
            next(it)
            time.sleep(0.25)
        assert stats.scored > 2, "not scored again after the server woke up"
        assert len(scorer.select(call).indices) == b
    assert server.proc.poll() is None
