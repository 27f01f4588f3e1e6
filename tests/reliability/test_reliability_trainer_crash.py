"""Data: a trainer process killed (SIGKILL) mid-run and resumed from its last checkpoint
(``JESTLoader.state_dict`` with the model and optimizer) delivers exactly the sub-batches,
and trains to exactly the losses, of the uninterrupted run.

Each run is a real trainer process: this file run as a script, against one scorer
process on loopback. Two crashes: mid-epoch, and just after a checkpoint taken at the
end of an epoch (the resumed loader must start the next epoch, not replay this one).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

N, B, FILTER = 640, 64, 0.75   # 10 super-batches per epoch, 16 examples each step
STEPS, CKPT_EVERY = 25, 5


def train(args: argparse.Namespace) -> None:
    """The trainer: a seeded MLP on digits, JESTLoader + RemoteScorer, fallback='raise'."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from support import KeyedDigits
    from torch.utils.data import DataLoader

    from jest_stream import JESTLoader, RemoteScorer, per_example_cross_entropy

    torch.set_num_threads(1)
    raw = np.load(args.data)

    # A shuffled order that is the same every time the DataLoader is iterated (what resuming
    # by replaying consumed super-batches needs).
    order = np.random.default_rng(0).permutation(N).tolist()
    data = DataLoader(KeyedDigits(raw, N), batch_size=B, sampler=order)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scorer = RemoteScorer(args.target, timeout=10)
    loader = JESTLoader(data, lambda batch: per_example_cross_entropy(model(batch["x"]), batch["y"]), scorer,
                        filter_ratio=FILTER, seed=5, fallback="raise", job="crash-test")
    step = 0
    if args.resume:
        ckpt = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        loader.load_state_dict(ckpt["loader"])
        step = ckpt["step"]
    with open(args.out, "a") as out:
        while step < args.steps:
            for sub in loader:
                loss = F.cross_entropy(model(sub["x"]), sub["y"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                out.write(json.dumps({"step": step, "keys": list(sub["__key__"]), "loss": float(loss),
                                      "fallbacks": loader.stats.fallbacks}) + "\n")
                out.flush()
                if step == args.crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, no flush
                if step % args.ckpt_every == 0:
                    tmp = args.ckpt + ".tmp"
                    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                                "loader": loader.state_dict()}, tmp)
                    os.replace(tmp, args.ckpt)
                if step >= args.steps:
                    break
    scorer.close()


def run_trainer(target: str, tmp_path, name: str, ckpt: str, *extra: str) -> tuple[int, list[dict]]:
    out = tmp_path / f"{name}.jsonl"
    args = [sys.executable, __file__, "--target", target, "--data", str(tmp_path / "digits.npz"),
            "--out", str(out), "--ckpt", str(tmp_path / f"{ckpt}.ckpt"), "--steps", str(STEPS),
            "--ckpt-every", str(CKPT_EVERY), *extra]
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where support.py is
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode, records


@pytest.mark.timeout(300)
def test_resumed_trainer_delivers_the_uninterrupted_sub_batches(start_server, per_example_model, digits,
                                                               tmp_path):
    np.savez(tmp_path / "digits.npz", x=digits["x"], y=digits["y"])
    server = start_server({"digits": per_example_model})
    code, whole = run_trainer(server.target, tmp_path, "whole", "whole")
    assert code == 0 and [r["step"] for r in whole] == list(range(1, STEPS + 1))
    assert all(r["fallbacks"] == 0 for r in whole)  # every step really selected by the scorer

    # Mid-epoch (last checkpoint at step 15, in epoch 2), and just after the checkpoint taken
    # at the end of epoch 1 (step 10): the resumed loader must begin epoch 2, not replay 1.
    for crash_at in (17, 11):
        name = f"crash{crash_at}"
        code, crashed = run_trainer(server.target, tmp_path, f"{name}-before", name, "--crash-at", str(crash_at))
        assert code == -signal.SIGKILL and [r["step"] for r in crashed] == list(range(1, crash_at + 1))
        code, resumed = run_trainer(server.target, tmp_path, f"{name}-after", name, "--resume")
        assert code == 0
        last_ckpt = crash_at // CKPT_EVERY * CKPT_EVERY
        assert [r["step"] for r in resumed] == list(range(last_ckpt + 1, STEPS + 1))
        for r in crashed + resumed:
            want = whole[r["step"] - 1]
            assert r["keys"] == want["keys"], f"crash at {crash_at}, step {r['step']}: a different sub-batch"
            assert r["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7), f"step {r['step']}"
        assert all(r["fallbacks"] == 0 for r in resumed)
    assert server.proc.poll() is None


def _main() -> None:
    p = argparse.ArgumentParser(description="the trainer process of test_reliability_trainer_crash")
    p.add_argument("--target", required=True)
    p.add_argument("--data", required=True, help="npz with the digits' x and y")
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--ckpt-every", type=int, default=CKPT_EVERY)
    p.add_argument("--crash-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    train(p.parse_args())


if __name__ == "__main__":
    _main()
