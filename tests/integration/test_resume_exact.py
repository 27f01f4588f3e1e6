"""Exact resume with a shuffling loader: a run stopped in the middle of epoch 1 or 3,
rebuilt from scratch (new DataLoader, new generator, new model) and restored from its
state_dicts, yields the same next sub-batches as an uninterrupted run. Plain
DataLoader and torchdata's StatefulDataLoader, with and without a seeded generator."""
from __future__ import annotations

import pytest
import torch
from loop import B, Run
from support import KeyedDigits as Digits
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from jest_stream import JESTLoader, LocalScorer, per_example_cross_entropy

# 640 examples, B = 64: 10 super-batches per epoch


def run(data, scorer, loader_cls, seeded: bool) -> Run:
    return Run(data, scorer, loader_cls=loader_cls, generator_seed=7 if seeded else None)


@pytest.fixture(scope="module")
def scorer(per_example_model):
    with LocalScorer(per_example_model, intra_op_threads=1) as s:
        yield s


@pytest.mark.parametrize("loader_cls", [DataLoader, StatefulDataLoader], ids=["DataLoader", "StatefulDataLoader"])
@pytest.mark.parametrize("seeded", [False, True], ids=["no-generator", "seeded-generator"])
@pytest.mark.parametrize("epoch", [1, 3])
def test_shuffled_resume_mid_epoch_is_exact(scorer, digits, loader_cls, seeded, epoch):
    data = Digits(digits, 640)
    stop_at, then = epoch * 10 + 4, 9  # 4 sub-batches into the epoch, then past its end
    expected = run(data, scorer, loader_cls, seeded).train(stop_at + then)
    first = run(data, scorer, loader_cls, seeded)
    assert first.train(stop_at) == expected[:stop_at]
    assert (first.loader.epoch, first.loader.step) == (epoch, stop_at)
    state = first.state_dict()
    del first  # the interruption
    second = run(data, scorer, loader_cls, seeded)
    second.load_state_dict(state)
    got = second.train(then)
    assert got == expected[stop_at:], f"resumed in epoch {epoch}: the next sub-batches differ"
    assert second.loader.epoch == epoch + 1
    # Epochs still reshuffle: the same positions of two epochs hold different keys.
    assert expected[0] != expected[10] and expected[10] != expected[20]


def test_resume_at_an_epoch_boundary_is_exact(scorer, digits):
    data = Digits(digits, 640)
    expected = run(data, scorer, DataLoader, True).train(25)
    first = run(data, scorer, DataLoader, True)
    first.train(20)
    state = first.state_dict()
    assert (state["loader"]["epoch"], state["loader"]["consumed"]) == (2, 0)  # the last sub-batch ended the epoch
    second = run(data, scorer, DataLoader, True)
    second.load_state_dict(state)
    assert second.train(5) == expected[20:]


def test_a_short_replay_on_resume_raises(scorer, digits):
    first = run(Digits(digits, 640), scorer, DataLoader, False)
    first.train(6)
    state = first.state_dict()
    second = run(Digits(digits, n=4 * B), scorer, DataLoader, False)  # the data shrank: 4 batches
    second.load_state_dict(state)
    with pytest.raises(RuntimeError, match="ended after 4 super-batches, but 6 were consumed"):
        second.train(1)


def test_epoch_and_len_stay_right_when_a_framework_stops_at_len(scorer, digits):
    job = run(Digits(digits, 640), scorer, DataLoader, False)
    assert len(job.loader) == 10
    for _ in range(2):  # like Lightning: take exactly len() items, never ask for one more
        it = iter(job.loader)
        for _ in range(len(job.loader)):
            next(it)
    assert (job.loader.epoch, job.loader.step) == (2, 20)
    assert job.loader.state_dict()["consumed"] == 0


def test_set_epoch_reaches_the_wrapped_sampler(scorer, digits):
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(Digits(digits, 640), num_replicas=2, rank=0, shuffle=True, seed=3)
    loader = JESTLoader(DataLoader(Digits(digits, 640), batch_size=B, sampler=sampler),
                        lambda b: per_example_cross_entropy(torch.zeros(len(b["y"]), 10), b["y"]),
                        scorer, n_select=16, seed=0)
    loader.sampler.set_epoch(4)  # what Lightning calls on a loader's .sampler
    epoch = iter(loader)
    next(epoch)
    assert sampler.epoch == 4 and loader.epoch == 4
    for _ in epoch:  # finish epoch 4; the next one is passed on by itself
        pass
    next(iter(loader))
    assert sampler.epoch == 5
    next(iter(loader))  # a new iter() after an epoch left mid-way starts the next epoch
    assert sampler.epoch == 6 and loader.epoch == 6


@pytest.mark.parametrize("kwargs, message", [
    ({"n_select": 80}, "n_select=80 of a super-batch of B=64"),
    ({"n_select": 64}, "n_select=64 of a super-batch of B=64"),
    ({"filter_ratio": 0.001}, "filter_ratio=0.001 keeps b=64 of a super-batch of B=64"),
])
def test_a_sub_batch_that_selects_nothing_is_refused(scorer, digits, kwargs, message):
    loader = JESTLoader(DataLoader(Digits(digits, 640), batch_size=B), lambda b: torch.zeros(len(b["y"])),
                        scorer, seed=0, **kwargs)
    with pytest.raises(ValueError, match=message):
        next(iter(loader))


def test_a_short_last_super_batch_is_kept_whole(scorer, digits):
    loader = JESTLoader(DataLoader(Digits(digits, n=B + 10), batch_size=B), lambda b: torch.zeros(len(b["y"])),
                        scorer, n_select=16, seed=0)
    assert [len(sub["y"]) for sub in loader] == [16, 10]
