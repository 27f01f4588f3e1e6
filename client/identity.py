"""Who a JESTLoader is: its rank, world size and the job id the scorer sees.

The job id (``<job>/rank<r>of<w>``) labels the scorer's fairness queue and metrics,
so every rank of one launch must share the ``<job>`` part and two launches must not.
torchrun's default run id is the literal ``none`` for every launch without
``--rdzv-id``, so it cannot be used as is. The base is, in order: ``job=``,
``$JEST_JOB_ID``, ``$TORCHELASTIC_RUN_ID`` unless it is ``none``; otherwise rank 0
makes one up (``<host>-<pid>-<uuid>``) and, when torch.distributed is initialised,
broadcasts it to the other ranks (with the loader's seed when none was given, so that
every rank shuffles alike). Without torch.distributed, ranks started by one
torchrun agent share ``torchrun-<host>-<agent pid>``.
"""
from __future__ import annotations

import os
import socket
import uuid

import torch

_UNSET_RUN_IDS = ("", "none")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, or (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def local_job_base(job: str | None = None) -> str:
    """The job base this process can decide alone (no communication)."""
    if job:
        return job
    for name in ("JEST_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name, "")
        if value.strip().lower() not in _UNSET_RUN_IDS:
            return value
    host = socket.gethostname()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: the agent is the parent
        return f"torchrun-{host}-{os.getppid()}"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def agree(job: str | None, seed: int, seed_given: bool) -> tuple[str, int]:
    """The job base and loader seed every rank agrees on: given ones (``job=``,
    $JEST_JOB_ID, a real $TORCHELASTIC_RUN_ID; ``seed=``) as they are, the rest rank
    0's, broadcast when torch.distributed is initialised. A collective in that case:
    every rank must call it (the loader does, at the start of its first epoch)."""
    given = job or os.environ.get("JEST_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
    known = bool(given) and given.strip().lower() not in _UNSET_RUN_IDS
    rank, world = distributed_rank()
    if world == 1 or (known and seed_given):
        return local_job_base(job), seed
    if known:
        mine = local_job_base(job)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        mine = f"torchrun-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    else:
        mine = local_job_base(None)
    box = [(mine, seed) if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    base, shared_seed = box[0]  # type: ignore[misc]
    return (mine if known else str(base)), (seed if seed_given else int(shared_seed))


def job_id(base: str, rank: int, world: int) -> str:
    """``<base>/rank<r>of<w>``."""
    return f"{base}/rank{rank}of{world}"
