"""torch.distributed with 2 processes (gloo on 127.0.0.1) sharing one scorer on loopback:
each rank selects from its own super-batches, its rank and world size reach the job id,
and nothing is delivered twice across ranks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
B, b = 64, 16


def _rank_main(rank: int, target: str, out_dir: str) -> None:
    """One trainer rank: a DistributedSampler shard, a JESTLoader on the shared scorer."""
    from support import KeyedDigits, digit_key, load_digits_arrays
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from jest_stream import JESTLoader, RemoteScorer, per_example_cross_entropy

    torch.set_num_threads(1)
    # Rendezvous through a file (no port to agree on); gloo's own sockets take ports the kernel assigns.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        data = KeyedDigits(load_digits_arrays(), 1024)
        sampler = DistributedSampler(data, shuffle=True, seed=0)
        torch.manual_seed(0)  # the same learner on every rank, as after DDP's broadcast
        model = torch.nn.Linear(64, 10)
        with RemoteScorer(target) as scorer:
            loader = JESTLoader(DataLoader(data, batch_size=B, sampler=sampler),
                                lambda batch: per_example_cross_entropy(model(batch["x"]), batch["y"]),
                                scorer, n_select=b, seed=9, job="ddp-test")
            delivered = [key for sub in loader for key in sub["__key__"]]
        shard = [digit_key(i) for i in sampler]
        dist.barrier()
        with open(f"{out_dir}/rank{rank}.json", "w") as fh:
            json.dump({"job_id": loader.job_id, "delivered": delivered, "shard": shard,
                       "fallbacks": loader.stats.fallbacks, "scored": loader.stats.scored}, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_ranks_select_from_their_own_shards(start_server, per_example_model, tmp_path):
    server = start_server({"digits": per_example_model})
    mp.spawn(_rank_main, args=(server.target, str(tmp_path)), nprocs=WORLD, join=True)
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
