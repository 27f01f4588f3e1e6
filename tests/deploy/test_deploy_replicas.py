"""Two scorer replicas behind one client (gRPC round_robin over both addresses, as with
the Kubernetes headless Service); one is killed mid-run.

Training goes on through the other replica, with ``fallback="raise"`` so that a step
the scorer did not answer fails the test instead of turning uniform; every super-batch
yields exactly one sub-batch, drawn from that super-batch, with no example twice; and
the sub-batches are exactly those the embedded LocalScorer selects for the same seed
and training (nothing lost, repeated or changed by the failover). Both replicas'
Prometheus metrics show answered Selects before the kill, and the survivor's after it.
"""
from __future__ import annotations

import signal

import numpy as np
import torch
from support import KeyedDigits, digit_key
from torch.utils.data import DataLoader, Dataset

from jest_stream.client import JESTLoader, LocalScorer, RemoteScorer, per_example_cross_entropy

B, N_SELECT, N_EXAMPLES, EPOCHS, SEED = 64, 16, 768, 2, 11  # 12 super-batches per epoch


def train(scorer, data: Dataset, on_step=None) -> tuple[list[list[str]], JESTLoader]:
    """A real training loop: SGD on each yielded sub-batch; returns its keys per step."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = JESTLoader(DataLoader(data, batch_size=B), lambda b: per_example_cross_entropy(model(b["x"]), b["y"]),
                        scorer, n_select=N_SELECT, sampler="joint", seed=SEED, fallback="raise",
                        job="deploy-replicas")
    steps: list[list[str]] = []
    for _ in range(EPOCHS):
        for sub in loader:
            loss = torch.nn.functional.cross_entropy(model(sub["x"]), sub["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append(list(sub["__key__"]))
            if on_step is not None:
                on_step(len(steps))
    return steps, loader


def selects(server) -> float:
    """Selects a replica answered OK (all jobs), from its /metrics."""
    return server.metric("jest_calls_total", method="Select", code="OK")


def scorer_calls(server) -> float:
    """Calls of the Scorer service (Select, Reference prefetches, ListModels) a replica
    answered OK, from its /metrics; health checks are not counted."""
    return sum(server.metric("jest_calls_total", method=m, code="OK") for m in ("Select", "Reference", "ListModels"))


def test_round_robin_over_two_replicas_survives_killing_one(start_server, per_example_model, digits):
    data = KeyedDigits(digits, N_EXAMPLES)
    with LocalScorer(per_example_model, name="digits", intra_op_threads=1) as local:
        expected, _ = train(local, data)

    replicas = [start_server({"digits": per_example_model}) for _ in range(2)]
    killed: dict = {}
    kill_at = EPOCHS * (N_EXAMPLES // B) // 3

    def kill_mid_run(step: int) -> None:
        """After step ``kill_at``, SIGKILL the replica that answered more Selects (a
        crash, not a drain; the next super-batch's reference prefetch may be in flight
        to it), having read both replicas' metrics."""
        if step == kill_at:
            calls = [scorer_calls(r) for r in replicas]
            victim = max(replicas, key=selects)
            survivor = replicas[1 - replicas.index(victim)]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(timeout=10)
            killed.update(step=step, calls=calls, victim=victim, survivor=survivor,
                          survivor_selects=selects(survivor))

    with RemoteScorer([r.target for r in replicas], timeout=20.0) as remote:
        steps, loader = train(remote, data, on_step=kill_mid_run)

    per_epoch = N_EXAMPLES // B
    assert killed["step"] == kill_at
    assert min(killed["calls"]) > 0, f"calls answered before the kill {killed['calls']}: round_robin " \
                                     "did not spread them over both replicas"
    assert killed["victim"].proc.returncode == -signal.SIGKILL

    # Training went on: one sub-batch per super-batch, from it, no example twice, no fallback.
    assert len(steps) == EPOCHS * per_epoch
    for t, keys in enumerate(steps):
        first = (t % per_epoch) * B
        super_batch = {digit_key(i) for i in range(first, first + B)}
        assert len(keys) == N_SELECT == len(set(keys)), f"step {t}: {keys}"
        assert set(keys) <= super_batch, f"step {t}: examples from outside its super-batch"
    stats = loader.stats
    assert stats.fallbacks == 0 and stats.scored == stats.sub_batches == len(steps)
    # Nothing lost, repeated or altered by the failover: the same selection as in-process.
    assert steps == expected

    # The survivor answered every step after the kill.
    survivor = killed["survivor"]
    after = selects(survivor) - killed["survivor_selects"]
    assert after >= len(steps) - killed["step"], f"the survivor answered {after} Selects after the kill"
    assert survivor.proc.poll() is None
    assert np.isfinite(stats.mean_score)
