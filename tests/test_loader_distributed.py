"""torch.distributed with 2 processes (gloo on 127.0.0.1) sharing one scorer on loopback:
each rank selects from its own super-batches, its rank and world size reach the job id,
and nothing is delivered twice across ranks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jest_stream.server.launch import free_port
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
B, b = 64, 16


def _rank_main(rank: int, target: str, port: int, out_dir: str) -> None:
    """One trainer rank: a DistributedSampler shard, a JESTLoader on the shared scorer."""
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, Dataset
    from torch.utils.data.distributed import DistributedSampler

    from jest_stream import JESTLoader, RemoteScorer, per_example_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        digits = load_digits()
        x = torch.tensor(digits.data[:1024] / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target[:1024], dtype=torch.int64)

        class Digits(Dataset):
            def __len__(self):
                return len(y)

            def __getitem__(self, i):
                return {"x": x[i], "y": y[i], "__key__": f"digit-{i:05d}"}

        sampler = DistributedSampler(Digits(), shuffle=True, seed=0)
        torch.manual_seed(0)  # the same learner on every rank, as after DDP's broadcast
        model = torch.nn.Linear(64, 10)
        with RemoteScorer(target) as scorer:
            loader = JESTLoader(DataLoader(Digits(), batch_size=B, sampler=sampler),
                                lambda batch: per_example_cross_entropy(model(batch["x"]), batch["y"]),
                                scorer, n_select=b, seed=9, job="ddp-test")
            delivered = [key for sub in loader for key in sub["__key__"]]
        shard = [f"digit-{i:05d}" for i in sampler]
        dist.barrier()
        with open(f"{out_dir}/rank{rank}.json", "w") as fh:
            json.dump({"job_id": loader.job_id, "delivered": delivered, "shard": shard,
                       "fallbacks": loader.stats.fallbacks, "scored": loader.stats.scored}, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_ranks_select_from_their_own_shards(start_server, per_example_model, tmp_path):
    server = start_server({"digits": per_example_model})
    mp.spawn(_rank_main, args=(server.target, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["job_id"] for r in ranks] == ["ddp-test/rank0of2", "ddp-test/rank1of2"]
    for r in ranks:
        assert r["fallbacks"] == 0 and r["scored"] == 8  # 512 examples per rank: 8 super-batches
        assert len(r["delivered"]) == 8 * b == len(set(r["delivered"]))
        assert set(r["delivered"]) <= set(r["shard"])  # selected from its own super-batches
    assert not set(ranks[0]["delivered"]) & set(ranks[1]["delivered"])  # nothing delivered twice
    # Both ranks scored; per-rank seeds differ, so equal positions are not selected in lockstep.
    pos = [np.array([r["shard"].index(k) % B for k in r["delivered"]]) for r in ranks]
    assert not np.array_equal(pos[0], pos[1])
