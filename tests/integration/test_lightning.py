"""PyTorch Lightning, strategy="ddp" on 2 CPU processes (gloo): with ``shard()`` under the
JESTLoader each rank selects from its own shard, epochs reshuffle (Lightning's
``sampler.set_epoch`` reaches the DistributedSampler), a mid-epoch checkpoint resumes
exactly, and JESTStatsCallback puts the selection stats in Lightning's logger."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "lightning_ddp.py"


@pytest.fixture(scope="module")
def ddp_run(per_example_model, tmp_path_factory):
    """One run of the script (Lightning's ddp launcher re-runs it for rank 1): 2 epochs
    with a checkpoint at step 7, then a fit resumed from it."""
    out = tmp_path_factory.mktemp("lightning")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), per_example_model], cwd=str(out),
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(450)
def test_ranks_select_from_their_own_shards_and_epochs_reshuffle(ddp_run):
    _, ranks = ddp_run
    for epoch in ("0", "1"):
        assert [len(r["full"][epoch]) for r in ranks] == [5, 5]  # 640 examples / 2 ranks / B=64
        keys = [{k for sub in r["full"][epoch] for k in sub} for r in ranks]
        assert len(keys[0]) == len(keys[1]) == 5 * 16
        assert not keys[0] & keys[1], f"epoch {epoch}: both ranks selected the same examples"
    for r in ranks:
        assert r["full"]["0"] != r["full"]["1"]
        assert {k for sub in r["full"]["0"] for k in sub} != {k for sub in r["full"]["1"] for k in sub}


@pytest.mark.timeout(450)
def test_a_mid_epoch_checkpoint_resumes_exactly(ddp_run):
    _, ranks = ddp_run
    for rank, r in enumerate(ranks):
        assert list(r["resumed"]) == ["1"]  # step 7 = epoch 1, batch 2 of 5
        assert r["resumed"]["1"] == r["full"]["1"][2:], f"rank {rank}: resumed sub-batches differ"


@pytest.mark.timeout(450)
def test_stats_reach_lightnings_logger(ddp_run):
    out, _ = ddp_run
    with open(out / "logs" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [float(row["jest/sub_batches"]) for row in rows if row.get("jest/sub_batches")]
    assert logged and logged[-1] == 10.0  # rank 0's 10 sub-batches over 2 epochs
    assert any(float(row["jest/reference_inferred"] or 0) > 0 for row in rows)
