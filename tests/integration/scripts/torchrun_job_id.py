"""Run by torchrun (2 processes): print this rank's JESTLoader job id before and after
torch.distributed is initialised, as one JSON line into OUT_DIR/rank<r>.json."""
import json
import os
import sys

import torch.distributed as dist

from jest_stream import JESTLoader, LocalScorer


def job_id(model_path: str) -> str:
    return JESTLoader([], lambda b: b, LocalScorer(model_path), seed=0).job_id


def main(out_dir: str, model_path: str) -> None:
    before = job_id(model_path)  # no torch.distributed: from the environment alone
    dist.init_process_group("gloo")
    try:
        after = job_id(model_path)  # rank 0 decides, broadcast
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as fh:
        json.dump({"before": before, "after": after, "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
