"""Resume: stop after k sub-batches, restore model, optimiser and loader from their
state_dicts in a new process-like setup (new objects), and the next sub-batches match
an uninterrupted run, mid-epoch and across an epoch boundary, with both scorers."""
from __future__ import annotations

import pytest
import torch
from loop import B, Run
from support import KeyedDigits, digit_key

from jest_stream import JESTLoader, LocalScorer, RemoteScorer, per_example_cross_entropy


def Trainer(data, scorer, shuffle: bool) -> Run:  # noqa: N802 - reads as the class it builds
    return Run(data, scorer, shuffle=shuffle)


def resumed_matches(data, scorer, shuffle: bool, stop_at: int, then: int) -> None:
    uninterrupted = Trainer(data, scorer, shuffle)
    expected = uninterrupted.train(stop_at + then)

    first = Trainer(data, scorer, shuffle)
    assert first.train(stop_at) == expected[:stop_at]
    state = first.state_dict()
    del first  # the interruption

    second = Trainer(data, scorer, shuffle)
    second.load_state_dict(state)
    assert second.loader.step == stop_at
    got = second.train(then)
    assert got == expected[stop_at:], f"resumed after {stop_at} sub-batches, the next ones differ"
    assert second.loader.stats.sub_batches == stop_at + then  # stats carry over
    assert second.loader.stats.fallbacks == 0


def test_resume_mid_epoch_with_shuffled_data(per_example_model, digits):
    with LocalScorer(per_example_model, intra_op_threads=1) as scorer:
        resumed_matches(KeyedDigits(digits, 640), scorer, shuffle=True, stop_at=4, then=5)


def test_resume_across_an_epoch_boundary(per_example_model, digits):
    with LocalScorer(per_example_model, intra_op_threads=1) as scorer:  # 10 super-batches per epoch
        resumed_matches(KeyedDigits(digits, 640), scorer, shuffle=False, stop_at=13, then=9)


def test_resume_with_a_remote_scorer(start_server, per_example_model, digits):
    server = start_server({"digits": per_example_model})
    with RemoteScorer(server.target) as scorer:
        resumed_matches(KeyedDigits(digits, 640), scorer, shuffle=True, stop_at=6, then=4)


class Counting:
    """An iterable with its own state_dict (like torchdata's StatefulDataLoader): the
    JESTLoader restores it instead of replaying consumed super-batches."""

    def __init__(self, digits, n_batches: int = 6):
        self.batches = [{"x": torch.from_numpy(digits["x"][i * B:(i + 1) * B]),
                         "y": torch.from_numpy(digits["y"][i * B:(i + 1) * B]),
                         "__key__": [digit_key(j) for j in range(i * B, (i + 1) * B)]}
                        for i in range(n_batches)]
        self.position = 0
        self.fetched = 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            self.fetched += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_resume_restores_a_stateful_loader(per_example_model, digits):
    model = torch.nn.Linear(64, 10)
    score = lambda b: per_example_cross_entropy(model(b["x"]), b["y"])  # noqa: E731
    with LocalScorer(per_example_model, intra_op_threads=1) as scorer:
        full = [b["__key__"] for b in JESTLoader(Counting(digits), score, scorer, seed=2)]
        first = JESTLoader(Counting(digits), score, scorer, seed=2)
        it = iter(first)
        head = [next(it)["__key__"] for _ in range(2)]
        state = first.state_dict()
        assert state["inner"] == {"position": 2}  # not 3: the super-batch fetched ahead is not consumed
        inner = Counting(digits)
        second = JESTLoader(inner, score, scorer, seed=2)
        second.load_state_dict(state)
        tail = [b["__key__"] for b in second]
    assert head + tail == full
    assert inner.fetched == 4  # restored, not replayed


def test_bad_state_is_refused(per_example_model, digits):
    loader = JESTLoader([], lambda b: b, LocalScorer(per_example_model))
    with pytest.raises(ValueError, match="state: version"):
        loader.load_state_dict({"version": 99})
