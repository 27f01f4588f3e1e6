"""Hugging Face accelerate: a JESTLoader around ``accelerator.prepare(DataLoader)`` under
the default config (whose prepared loader has a state_dict that raises), exact resume
through ``save_state``/``load_state`` with ``register_for_checkpointing``, and
``accelerate launch`` with 2 CPU processes (``--multi_gpu`` is its torch.distributed.run
launcher; ``Accelerator(cpu=True)`` in the script keeps both processes on the CPU, gloo:
``--cpu --num_processes 2`` alone starts one process unless mpirun is configured)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from loop import learner, train
from support import KeyedDigits as Digits
from torch.utils.data import DataLoader

from jest_stream import JESTLoader, LocalScorer, per_example_cross_entropy

B = 64
SCRIPT = Path(__file__).parent / "scripts" / "accelerate_train.py"


class Run:
    """A training script under accelerate's default config: model, optimiser and a
    shuffling DataLoader prepared by a fresh Accelerator, a JESTLoader around it,
    registered for checkpointing."""

    def __init__(self, digits, scorer):
        self.accelerator = Accelerator()
        model = learner()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        base = DataLoader(Digits(digits, 640), batch_size=B, shuffle=True)
        self.model, self.opt, self.base = self.accelerator.prepare(model, opt, base)
        self.loader = JESTLoader(self.base, self.score, scorer, filter_ratio=0.75, seed=5)
        self.accelerator.register_for_checkpointing(self.loader)

    def score(self, batch):
        return per_example_cross_entropy(self.model(batch["x"]), batch["y"])

    def train(self, n: int) -> list[list[str]]:
        return train(self.loader, self.model, self.opt, n, backward=self.accelerator.backward)


@pytest.fixture(scope="module")
def scorer(per_example_model):
    with LocalScorer(per_example_model, intra_op_threads=1) as s:
        yield s


def test_default_config_runs_two_epochs(digits, scorer):
    run = Run(digits, scorer)
    with pytest.raises(Exception):  # noqa: B017 - what made the old loader crash at step 1
        run.base.state_dict()
    seen = run.train(2 * len(run.loader))
    assert run.loader.epoch == 2 and len(seen) == 20
    assert run.loader.stats.fallbacks == 0
    assert seen[:10] != seen[10:]  # the second epoch is reshuffled


def test_save_state_and_load_state_resume_exactly(digits, scorer, tmp_path):
    expected = Run(digits, scorer).train(23)
    first = Run(digits, scorer)
    assert first.train(14) == expected[:14]  # mid-epoch 1
    first.accelerator.save_state(str(tmp_path / "ckpt"))
    del first
    second = Run(digits, scorer)
    second.accelerator.load_state(str(tmp_path / "ckpt"))
    assert second.loader.step == 14
    assert second.train(9) == expected[14:], "resumed through accelerate: the next sub-batches differ"


@pytest.mark.timeout(400)
def test_accelerate_launch_with_two_cpu_processes(per_example_model, tmp_path):
    # --main_process_port 0: accelerate asks the kernel for one
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", str(SCRIPT), str(tmp_path), per_example_model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["len"] for r in ranks] == [5, 5]  # 10 super-batches shared by 2 processes
    assert ranks[0]["job_id"].rsplit("/", 1)[0] == ranks[1]["job_id"].rsplit("/", 1)[0]
    for epoch in range(2):
        keys = [{k for sub in r["epochs"][epoch] for k in sub} for r in ranks]
        assert len(keys[0]) == len(keys[1]) == 5 * 16
        assert not keys[0] & keys[1], f"epoch {epoch}: the ranks trained on the same examples"
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled
    assert all(r["fallbacks"] == 0 for r in ranks)
