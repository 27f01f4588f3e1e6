"""torchrun without --rdzv-id sets TORCHELASTIC_RUN_ID=none for every launch: the default
job id must still be one per launch, shared by its ranks, and differ between launches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "torchrun_job_id.py"


def launch(out_dir: Path, model_path: str) -> list[dict]:
    out_dir.mkdir()
    # c10d rendezvous on a port the kernel assigns; no --rdzv-id, so the run id is "none"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
           str(SCRIPT), str(out_dir), model_path]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("JEST_JOB_ID", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(400)
def test_torchrun_launches_get_one_job_id_each(per_example_model, tmp_path):
    first, second = launch(tmp_path / "a", per_example_model), launch(tmp_path / "b", per_example_model)
    for ranks in (first, second):
        assert [r["run_id"] for r in ranks] == ["none", "none"]  # torchrun's default: useless as is
        for when in ("before", "after"):
            bases = {r[when].rsplit("/", 1)[0] for r in ranks}
            assert len(bases) == 1, f"ranks of one launch disagree {when} init: {bases}"
            assert "none" not in bases
        assert [r["after"].rsplit("/", 1)[1] for r in ranks] == ["rank0of2", "rank1of2"]
    for when in ("before", "after"):
        assert first[0][when].rsplit("/", 1)[0] != second[0][when].rsplit("/", 1)[0]
